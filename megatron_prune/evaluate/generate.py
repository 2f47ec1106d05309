"""Greedy decoding through the pipeline schedule (full recompute per token: simple and exact;
meant for smoke tests and demos, not serving)."""

from __future__ import annotations

import torch

from megatron_prune.errors import UserError
from megatron_prune.evaluate.forward import forward_reduce, gather_vocab


def greedy_generate(
    chunks: list[torch.nn.Module],
    prompt_ids: list[int],
    max_new_tokens: int,
    vocab_size: int,
    eos_id: int | None = None,
) -> list[int]:
    """The ids greedily generated after ``prompt_ids`` (stops at EOS)."""
    if not prompt_ids:
        raise UserError("the prompt is empty")
    ids = list(prompt_ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        tokens = torch.tensor([ids])

        def reduce(logits: torch.Tensor) -> torch.Tensor:
            last = gather_vocab(logits[:, -1:].float(), vocab_size)  # [1, 1, V]
            return last.argmax(-1).reshape(1).cpu()

        nxt = int(forward_reduce(chunks, tokens, reduce)[0])
        if eos_id is not None and nxt == eos_id:
            break
        ids.append(nxt)
        new.append(nxt)
    return new
