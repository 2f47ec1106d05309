"""Model FLOPs per token for each phase ``bench`` times, from the ``plan`` cost model
(:mod:`megatron_prune.plan.cost`), so bench's TFLOP/s and plan's budgets count the same thing.

Conventions (Megatron's and Kaplan et al.'s): a multiply-add is 2 FLOPs; attention counts the
whole window (the causal mask is ignored); a training step is 3 x the forward (backward = 2 x
forward), with no recomputation counted. Decoding position ``p`` (0-based) attends ``p + 1``
keys, so its attention term is the cost model's at sequence length ``p + 1``.
"""

from __future__ import annotations

from megatron_prune.models.arch import ModelArch
from megatron_prune.plan.cost import model_flops

TRAIN_FACTOR = 3  # forward + backward (2 x forward)


def prefill_flops_per_token(arch: ModelArch, seq_len: int) -> int:
    """Forward FLOPs per token of a ``seq_len``-token sequence: blocks plus output layer."""
    return model_flops(arch, seq_len)


def train_flops_per_token(arch: ModelArch, seq_len: int) -> int:
    """Forward + backward FLOPs per trained token (the optimizer's elementwise work is not
    counted, as in MFU's usual definition)."""
    return TRAIN_FACTOR * model_flops(arch, seq_len)


def decode_flops_per_token(arch: ModelArch, prompt_len: int, new_tokens: int) -> float:
    """Mean forward FLOPs of one decoded token, over ``new_tokens`` steps that follow a
    ``prompt_len``-token prompt (positions prompt_len .. prompt_len + new_tokens - 1)."""
    steps = range(prompt_len, prompt_len + new_tokens)
    return sum(model_flops(arch, p + 1) for p in steps) / new_tokens
