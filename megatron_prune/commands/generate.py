"""``megatron-prune generate CKPT --prompt TEXT``: greedy continuation, at any layout."""

from __future__ import annotations

import argparse

from megatron_prune.commands.common import (
    add_checkpoint_args,
    open_checkpoint,
    world_size_needed,
)
from megatron_prune.commands.common import validate_checkpoint as validate

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_args(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)


def run(args: argparse.Namespace) -> None:
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.evaluate.generate import greedy_generate
    from megatron_prune.log import is_rank0

    tokenizer = load_tokenizer(args.checkpoint)
    model = open_checkpoint(args)
    ids = tokenizer.encode(args.prompt)
    if model.arch.needs_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    new = greedy_generate(
        model.chunks, ids, args.max_new_tokens, model.arch.vocab_size, tokenizer.eos_id
    )
    if is_rank0():
        print(args.prompt + tokenizer.decode(new), flush=True)
