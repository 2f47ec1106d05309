"""Online knowledge distillation: vocabulary-parallel KL (the teacher+student loop is next)."""
