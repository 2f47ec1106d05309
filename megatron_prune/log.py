"""Rank-0 logging: one line per event, to stderr, prefixed with the tool name."""

from __future__ import annotations

import sys

import torch


def is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log(message: str) -> None:
    if is_rank0():
        print(f"[megatron-prune] {message}", file=sys.stderr, flush=True)
