"""``megatron-prune data build --tokenizer CKPT --input FILE --output PREFIX``: text or JSONL to a
Megatron indexed dataset (PREFIX.bin / PREFIX.idx) with a checkpoint's tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "validate"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["build"], help="what to do")
    parser.add_argument("--tokenizer", required=True, help="a checkpoint whose tokenizer to use")
    parser.add_argument("--input", required=True,
                        help="UTF-8 text (blank lines separate documents) or .jsonl")  # fmt: skip
    parser.add_argument("--output", required=True, help="output prefix (writes .bin and .idx)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")


def validate(args: argparse.Namespace) -> None:
    from megatron_prune.checkpoint.atomic import OutputExistsError
    from megatron_prune.data.tokenizer import load_tokenizer

    if not Path(args.input).is_file():
        raise UserError(f"--input {args.input} does not exist")
    for ext in (".bin", ".idx"):
        if Path(args.output + ext).exists() and not args.overwrite:
            raise OutputExistsError(Path(args.output + ext))
    load_tokenizer(args.tokenizer)  # fails early if the checkpoint has none


def run(args: argparse.Namespace) -> None:
    from megatron_prune.data.indexed import build_indexed_dataset
    from megatron_prune.data.tokenizer import load_tokenizer

    validate(args)
    report = build_indexed_dataset(
        load_tokenizer(args.tokenizer), Path(args.input), Path(args.output), args.json_key
    )
    print(json.dumps(report.to_dict()), flush=True)
