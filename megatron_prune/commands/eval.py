"""``megatron-prune eval ppl CKPT --data FILE``: held-out perplexity as one JSON line."""

from __future__ import annotations

import argparse
import json

from megatron_prune import api
from megatron_prune.commands.common import (
    add_checkpoint_args,
    validate_checkpoint,
    world_size_needed,
)
from megatron_prune.distributed import layout_from_args

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metric", choices=["ppl"], help="what to evaluate")
    add_checkpoint_args(parser)
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")


def validate(args: argparse.Namespace) -> None:
    validate_checkpoint(args)
    api.check_text(args.data, "--data")


def run(args: argparse.Namespace) -> None:
    from megatron_prune.log import is_rank0

    result = api.perplexity(args.checkpoint, args.data, seq_len=args.seq_len,
                            max_tokens=args.max_tokens, layout=layout_from_args(args),
                            device=args.device)  # fmt: skip
    if is_rank0():
        print(json.dumps(result.to_dict()), flush=True)
