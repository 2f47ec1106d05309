"""Pruning surgery: pure functions from (whole Megatron tensors, architecture, scores, target) to
(whole Megatron tensors, architecture). Nothing here imports torch.distributed; the ``prune``
command around it reads and writes sharded checkpoints."""
