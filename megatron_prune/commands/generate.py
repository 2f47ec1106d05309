"""``megatron-prune generate CKPT --prompt TEXT``: greedy continuation, at any layout."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.commands.common import add_checkpoint_args, world_size_needed
from megatron_prune.commands.common import validate_checkpoint as validate
from megatron_prune.compute import add_compute_args, compute_from_args
from megatron_prune.distributed import layout_from_args

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_args(parser)
    add_compute_args(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> None:
    from megatron_prune.log import is_rank0

    text = api.generate(args.checkpoint, args.prompt, max_new_tokens=args.max_new_tokens,
                        layout=layout_from_args(args), device=args.device,
                        compute=compute_from_args(args))  # fmt: skip
    if is_rank0():
        print(text, flush=True)
