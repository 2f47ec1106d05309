"""``megatron-prune eval ppl CKPT --data FILE``: held-out perplexity as one JSON line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_prune.commands.common import (
    add_checkpoint_args,
    open_checkpoint,
    world_size_needed,
)
from megatron_prune.commands.common import validate_checkpoint as validate
from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("metric", choices=["ppl"], help="what to evaluate")
    add_checkpoint_args(parser)
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")


def run(args: argparse.Namespace) -> None:
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.evaluate.perplexity import perplexity
    from megatron_prune.log import is_rank0

    data = Path(args.data)
    if not data.is_file():
        raise UserError(f"--data {data} does not exist")
    tokenizer = load_tokenizer(args.checkpoint)
    ids = tokenizer.encode(data.read_text(encoding="utf-8"))
    model = open_checkpoint(args)
    bos = tokenizer.bos_id if model.arch.needs_bos else None
    result = perplexity(
        model.chunks, ids, args.seq_len, model.arch.vocab_size, bos, args.max_tokens
    )
    if is_rank0():
        print(json.dumps(result.to_dict()), flush=True)
