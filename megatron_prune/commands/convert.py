"""``megatron-prune convert SRC DST``: GGUF / HF / Megatron in, Megatron (any TP x PP) or HF out."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.distributed import add_layout_args, layout_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="gguf:FILE, a Hugging Face folder, or a megatron-prune checkpoint"
    )
    parser.add_argument("dst", help="output folder (written atomically)")
    parser.add_argument("--to", choices=["megatron", "hf"], default="megatron")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    add_layout_args(parser)


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp if args.to == "megatron" else 1


def validate(args: argparse.Namespace) -> None:
    api.check_convert(args.src, args.dst, to=args.to, layout=layout_from_args(args),
                      overwrite=args.overwrite)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    api.convert(args.src, args.dst, to=args.to, layout=layout_from_args(args),
                device=args.device, overwrite=args.overwrite)  # fmt: skip
