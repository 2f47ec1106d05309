"""The distillation objective on the last pipeline stage, in Megatron's loss-function convention.

loss per token = (1 - lm_weight) * KL(teacher || student) + lm_weight * CE(student, next token),
masked by the batch's loss mask. The loss function returns the *sum* over tokens and the token
count, and training runs with ``calculate_per_token_loss``: Megatron then divides the gradients by
the number of tokens of the whole global batch (all micro-batches, all DP ranks), which makes a
step independent of how the batch is split over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_prune.distill.kl import vocab_parallel_cross_entropy, vocab_parallel_kl
from megatron_prune.distill.loss_config import DistillLossConfig
from megatron_prune.errors import UserError
from megatron_prune.evaluate.forward import vocab_shard_range


def distillation_loss(
    config: DistillLossConfig,
    vocab_size: int,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    logits: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss function: ``logits`` = (student, teacher) [b, s, Vp/t] shards, or the
    student's alone when training without a teacher (``lm_weight`` = 1).

    Returns (summed loss, token count, {name: [summed value, token count]}), the last for logging.
    """
    student, teacher = logits if isinstance(logits, tuple) else (logits, None)
    if teacher is None and config.lm_weight < 1.0:
        raise UserError("distillation without a teacher: set lm_weight to 1 (LM loss only)")
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    start, _ = vocab_shard_range(student.shape[-1] * tp)
    mask = loss_mask.to(torch.float32)
    tokens = mask.sum()
    report: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=student.device)
    if config.lm_weight < 1.0:
        kl = vocab_parallel_kl(
            student, teacher, group=group, vocab_start=start, vocab_size=vocab_size,
            temperature=config.temperature, reverse=config.reverse,
            scale_by_t2=config.scale_by_t2, top_k=config.top_k, chunk_tokens=config.chunk_tokens,
        )  # fmt: skip
        kl_sum = (kl * mask).sum()
        total = total + (1.0 - config.lm_weight) * kl_sum
        report["kl"] = torch.stack([kl_sum.detach(), tokens])
    if config.lm_weight > 0.0:
        ce = vocab_parallel_cross_entropy(
            student, labels, group=group, vocab_start=start, vocab_size=vocab_size,
            chunk_tokens=config.chunk_tokens,
        )  # fmt: skip
        ce_sum = (ce * mask).sum()
        total = total + config.lm_weight * ce_sum
        report["ce"] = torch.stack([ce_sum.detach(), tokens])
    report["loss"] = torch.stack([total.detach(), tokens])
    return total, tokens.to(torch.int), report
