"""``megatron-prune bench [CKPT ...] [--shape NAME|arch.yaml ...]``: prefill, KV-cache decode
and training-step tokens/s, TFLOP/s and MFU of each model, the first as the reference of the
speed-up / parameter ratios. One JSON line per model on stdout (``--out FILE.jsonl`` too), a
table on stderr. ``--shape`` builds random weights, so no checkpoint has to travel."""

from __future__ import annotations

import argparse
import json
import sys

from megatron_prune import api
from megatron_prune.bench.options import PHASES, BenchOptions
from megatron_prune.compute import add_compute_args
from megatron_prune.distributed import add_layout_args, layout_from_args
from megatron_prune.models.shapes import SHAPES

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CKPT",
        help="megatron-prune checkpoint folders (timed first, in this order)",
    )
    parser.add_argument("--shape", action="append", default=[], metavar="NAME|FILE",
                        help=f"random weights of a named shape ({', '.join(SHAPES)}) or of an "
                             "arch YAML; repeatable")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step and DP rank")
    parser.add_argument(
        "--seq-len", type=int, default=2048, help="tokens per row (the decode prompt too)"
    )
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="default: --batch-size at PP=1, 1 with a pipeline",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per phase")
    parser.add_argument("--iters", type=int, default=5, help="timed calls per phase (median)")
    parser.add_argument(
        "--decode-tokens", type=int, default=32, help="tokens decoded per row after the prompt"
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of %(default)s"
    )
    parser.add_argument(
        "--no-layer-timings",
        action="store_true",
        help="skip the per-layer forward pass (timed layer by layer)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak for MFU (default: the built-in table)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--overwrite", action="store_true")
    add_compute_args(parser)  # --attention-backend, --bf16 / --fp32 (default: by device)
    add_layout_args(parser)


def _options(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        batch_size=args.batch_size, seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
        warmup=args.warmup, iters=args.iters, decode_tokens=args.decode_tokens,
        phases=tuple(p.strip() for p in args.phases.split(",") if p.strip()),
        layer_timings=not args.no_layer_timings,
    )  # fmt: skip


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(options=_options(args), precision=args.precision, layout=layout_from_args(args),
                attention_backend=args.attention_backend, out=args.out,
                overwrite=args.overwrite)  # fmt: skip


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp


def validate(args: argparse.Namespace) -> None:
    api.check_bench(args.checkpoints, args.shape, **_kwargs(args))


def run(args: argparse.Namespace) -> None:
    from megatron_prune.bench.report import table
    from megatron_prune.log import is_rank0

    options = _options(args)
    records = api.bench(args.checkpoints, args.shape, peak_tflops=args.peak_tflops,
                        device=args.device, **_kwargs(args))  # fmt: skip
    if is_rank0():
        for record in records:
            print(json.dumps(record), flush=True)
        print(table(records, options.phases), file=sys.stderr, flush=True)
