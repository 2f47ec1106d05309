"""Perplexity under a fixed protocol, identical for Megatron and Hugging Face models.

Protocol: tokenize the text without special tokens; cut non-overlapping windows of ``seq_len``
tokens (for models that need BOS, each window is BOS + seq_len - 1 text tokens); score every
next-token prediction inside each window; a final shorter window is scored too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core import tensor_parallel

from megatron_prune.errors import UserError
from megatron_prune.evaluate.forward import forward_reduce, mask_vocab_padding


def windows(ids: list[int], seq_len: int, bos_id: int | None) -> Iterator[list[int]]:
    """The evaluation windows. Example: ids=[5,6,7,8,9], seq_len=3, bos=None -> [5,6,7], [8,9];
    with bos=1 -> [1,5,6], [1,7,8], [1,9]."""
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    step = seq_len - 1 if bos_id is not None else seq_len
    for start in range(0, len(ids), step):
        w = ids[start : start + step]
        w = [bos_id, *w] if bos_id is not None else w
        if len(w) >= 2:
            yield w


@dataclass
class PerplexityResult:
    tokens: int
    nll: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "nll": self.nll, "ppl": self.ppl}


def window_nll_sum(chunks: list[torch.nn.Module], window: list[int], vocab_size: int) -> float:
    """Summed next-token NLL of one window, from vocab-parallel logits (never gathered)."""
    tokens = torch.tensor([window])
    labels = tokens[:, 1:]

    def reduce(logits: torch.Tensor) -> torch.Tensor:
        logits = mask_vocab_padding(logits[:, :-1].float(), vocab_size)
        # vocab_parallel_cross_entropy wants [s, b, V/t] and [s, b]
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits.transpose(0, 1).contiguous(), labels.t().contiguous().to(logits.device)
        )
        return losses.double().sum().reshape(1).cpu()  # [1]: this micro-batch's sum

    return float(forward_reduce(chunks, tokens, reduce)[0])


def perplexity(
    chunks: list[torch.nn.Module],
    ids: list[int],
    seq_len: int,
    vocab_size: int,
    bos_id: int | None,
    max_tokens: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    from megatron_prune.progress import progress_bar

    if max_tokens is not None:
        ids = ids[:max_tokens]
    wins = list(windows(ids, seq_len, bos_id))
    if not wins:
        raise UserError("the evaluation text is too short: it yields no token to score")
    total, count = 0.0, 0
    for w in progress_bar(wins, desc="ppl", unit="window", enabled=progress):
        total += window_nll_sum(chunks, w, vocab_size)
        count += len(w) - 1
    return PerplexityResult(tokens=count, nll=total / count)
