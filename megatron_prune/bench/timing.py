"""Wall-clock timing of device work: synchronise, then ``time.perf_counter``.

Kernels on an accelerator run asynchronously: a timer read before the device has finished
measures the launch, not the work. Every timed region here starts and ends with a device sync
(a no-op on the CPU).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for all work queued on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int,
               iters: int) -> list[float]:  # fmt: skip
    """Seconds of each of ``iters`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def median(seconds: list[float]) -> float:
    """The median: robust to one slow iteration (a page fault, another process)."""
    return statistics.median(seconds)
