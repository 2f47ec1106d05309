"""``megatron-prune convert SRC DST``: GGUF / HF / Megatron in, Megatron (any TP x PP) or HF out."""

from __future__ import annotations

import argparse
import shlex

from megatron_prune import api
from megatron_prune.distributed import add_layout_args, layout_from_args
from megatron_prune.errors import UserError
from megatron_prune.log import is_rank0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="gguf:FILE, a Hugging Face folder, or a megatron-prune checkpoint"
    )
    parser.add_argument("dst", help="output folder (written atomically)")
    parser.add_argument("--to", choices=["megatron", "hf"], default="megatron")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--tokenizer", default=None,
                        help="Hugging Face tokenizer folder for a Megatron-LM source whose "
                             "args name none")  # fmt: skip
    parser.add_argument("--print-megatron-lm-args", action="store_true",
                        help="print the Megatron-LM flags that build DST's model")  # fmt: skip
    add_layout_args(parser)


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp if args.to == "megatron" else 1


def validate(args: argparse.Namespace) -> None:
    source = api.check_convert(args.src, args.dst, to=args.to, layout=layout_from_args(args),
                               overwrite=args.overwrite, tokenizer=args.tokenizer)  # fmt: skip
    if args.print_megatron_lm_args and args.to != "megatron":
        raise UserError("--print-megatron-lm-args describes a Megatron checkpoint: drop --to hf")
    if args.print_megatron_lm_args:
        from megatron_prune.checkpoint.megatron_lm_format import megatron_lm_flags

        megatron_lm_flags(source.arch)  # refuses, before any work, what Megatron-LM cannot build


def run(args: argparse.Namespace) -> None:
    api.convert(args.src, args.dst, to=args.to, layout=layout_from_args(args),
                device=args.device, overwrite=args.overwrite,
                tokenizer=args.tokenizer)  # fmt: skip
    if args.print_megatron_lm_args and is_rank0():
        print(shlex.join(api.megatron_lm_args(args.dst)), flush=True)
