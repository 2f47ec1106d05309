"""How a command computes: core-attention backend, precision and activation recomputation.

These change speed and memory, never which parameters a checkpoint holds, so they are flags of
the run (like Megatron-LM's ``--bf16`` and ``--recompute-granularity``), not of the model.
Precision defaults follow the device: bf16 on a GPU or NPU, fp32 on the CPU (where bf16 is
slower on most CPUs and fp32 keeps the layout tests exact).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from megatron_prune.errors import UserError

# core attention: auto (fused SDPA where it is exact for the model), sdpa, or megatron-core's
# local DotProductAttention (models/attention.py builds them)
ATTENTION_BACKENDS = ("auto", "sdpa", "local")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RECOMPUTE_GRANULARITIES = ("selective", "full")
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ComputeOptions:
    attention_backend: str = "auto"
    precision: str = "auto"  # auto: bf16 on an accelerator, fp32 on the CPU
    recompute_granularity: str | None = None  # training only: Megatron's selective | full

    def __post_init__(self) -> None:
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise UserError(
                f"--attention-backend {self.attention_backend}: choose one of "
                f"{', '.join(ATTENTION_BACKENDS)}"
            )
        if self.precision not in PRECISIONS:
            raise UserError(f"precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
            raise UserError(
                f"--recompute-granularity {self.recompute_granularity}: choose "
                f"{' or '.join(RECOMPUTE_GRANULARITIES)}"
            )

    def resolved_precision(self, device: torch.device | None) -> str:
        """``bf16``, ``fp16`` or ``fp32`` for models placed on ``device`` (None: the CPU)."""
        if self.precision != "auto":
            return self.precision
        on_accelerator = device is not None and device.type != "cpu"
        return "bf16" if on_accelerator else "fp32"

    def dtype(self, device: torch.device | None) -> torch.dtype:
        return PRECISION_DTYPES[self.resolved_precision(device)]


def add_compute_args(parser: argparse.ArgumentParser, training: bool = False) -> None:
    """--attention-backend and the precision flags (Megatron-LM's names); with ``training``
    also --fp16 (dynamic loss scaling) and --recompute-granularity."""
    group = parser.add_argument_group("compute")
    group.add_argument(
        "--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
        help="core attention: auto = fastest available (torch_npu's fused kernel on Ascend, "
        "torch SDPA elsewhere); local = megatron-core's unfused DotProductAttention",
    )  # fmt: skip
    precision = group.add_mutually_exclusive_group()
    precision.add_argument(
        "--bf16", dest="precision", action="store_const", const="bf16",
        help="compute in bf16 (default on GPU/NPU)",
    )  # fmt: skip
    if training:
        precision.add_argument(
            "--fp16", dest="precision", action="store_const", const="fp16",
            help="compute in fp16 with dynamic loss scaling",
        )  # fmt: skip
    precision.add_argument(
        "--fp32", dest="precision", action="store_const", const="fp32",
        help="compute in fp32 (default on the CPU)",
    )  # fmt: skip
    parser.set_defaults(precision="auto")
    if training:
        group.add_argument(
            "--recompute-granularity", choices=RECOMPUTE_GRANULARITIES, default=None,
            help="activation recomputation (Megatron's names): selective = core attention, "
            "full = whole layers",
        )  # fmt: skip


def compute_from_args(args: argparse.Namespace) -> ComputeOptions:
    return ComputeOptions(
        attention_backend=args.attention_backend,
        precision=args.precision,
        recompute_granularity=getattr(args, "recompute_granularity", None),
    )
