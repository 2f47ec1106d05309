"""Calibration samples: the text tokenized once, packed into non-overlapping windows of
``seq_len`` tokens (no padding), and ``samples`` of them drawn by a seeded permutation, so every
rank and every rerun sees the same list in the same order."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from megatron_prune.errors import DataError


class CalibrationError(DataError):
    pass


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def packed_samples(
    ids: list[int], samples: int, seq_len: int, seed: int, bos_id: int | None = None
) -> torch.Tensor:
    """[samples, seq_len] token ids. With ``bos_id`` every sample is BOS + seq_len-1 tokens.

    Example: ids 0..9, seq_len 3, no BOS -> windows [0,1,2] [3,4,5] [6,7,8]; samples=2 picks two
    of them in a seed-determined order.
    """
    if samples < 1 or seq_len < 2:
        raise CalibrationError("--samples must be >= 1 and --seq-len >= 2")
    body = seq_len - 1 if bos_id is not None else seq_len
    available = len(ids) // body
    if available < samples:
        raise CalibrationError(
            f"the calibration text has {len(ids)} tokens: {available} windows of {seq_len}, "
            f"fewer than --samples {samples}; use more text, fewer samples or a shorter --seq-len"
        )
    windows = torch.tensor(ids[: available * body]).view(available, body)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    chosen = windows[order]
    if bos_id is not None:
        chosen = torch.cat([torch.full((samples, 1), bos_id), chosen], dim=1)
    return chosen
