"""Online knowledge distillation: vocabulary-parallel KL and cross-entropy (``kl``, ``loss``),
the teacher+student pipeline pair (``pair``), the training loop on megatron-core's schedules,
DDP and optimizers (``trainer``), its checkpoints (``state``) and metrics (``metrics``)."""
