"""What to keep, from scores: always the highest scores, returned in ascending index order so
kept units stay in their original relative order."""

from __future__ import annotations

import torch


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (ties broken by lower index), sorted ascending.

    Example: scores [0.1, 0.9, 0.5, 0.7], k=2 -> [1, 3].
    """
    if k > scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()}")
    order = torch.argsort(scores.double(), descending=True, stable=True)
    return order[:k].sort().values


def layers_to_drop(block_influence: torch.Tensor, keep: int) -> list[int]:
    """The ``L - keep`` layers with the lowest Block Influence (Pangu Light Eq. 4, ShortGPT)."""
    dropped = set(range(block_influence.numel())) - set(top_indices(block_influence, keep).tolist())
    return sorted(dropped)
