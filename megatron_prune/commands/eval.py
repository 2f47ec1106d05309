"""``megatron-prune eval ppl CKPT --data FILE [--out FILE.json]``: held-out perplexity as one
JSON line; ``--out`` also writes it, with the checkpoint, the data and the parameter counts, to a
file (replaced atomically; :mod:`megatron_prune.evaluate.results`) that ``report`` plots
against the model's size."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_prune import api
from megatron_prune.commands.common import (
    add_checkpoint_args,
    validate_checkpoint,
    world_size_needed,
)
from megatron_prune.compute import add_compute_args, compute_from_args
from megatron_prune.distributed import layout_from_args
from megatron_prune.errors import UserError
from megatron_prune.evaluate.results import perplexity_record, write_result

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metric", choices=["ppl"], help="what to evaluate")
    add_checkpoint_args(parser)
    add_compute_args(parser)
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    parser.add_argument("--out", default=None,
                        help="also write the result (and parameter counts) to this JSON file")


def validate(args: argparse.Namespace) -> None:
    validate_checkpoint(args)
    api.check_text(args.data, "--data")
    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder: name the JSON file to write")
    if args.out:
        from megatron_prune.paths import check_not_input, check_writable

        check_not_input(args.out, "--out", {"CHECKPOINT": args.checkpoint, "--data": args.data})
        check_writable(args.out)


def run(args: argparse.Namespace) -> None:
    from megatron_prune.log import is_rank0

    result = api.perplexity(args.checkpoint, args.data, seq_len=args.seq_len,
                            max_tokens=args.max_tokens, layout=layout_from_args(args),
                            device=args.device, compute=compute_from_args(args))  # fmt: skip
    if is_rank0():
        print(json.dumps(result.to_dict()), flush=True)
        if args.out:
            record = perplexity_record(args.checkpoint, args.data, args.seq_len,
                                       args.max_tokens, result.to_dict())  # fmt: skip
            write_result(args.out, record)
