"""``megatron-prune data build --tokenizer CKPT --input FILE --output PREFIX``: text or JSONL to a
Megatron indexed dataset (PREFIX.bin / PREFIX.idx) with a checkpoint's tokenizer."""

from __future__ import annotations

import argparse
import json

from megatron_prune import api

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
    api.check_build_dataset(args.tokenizer, args.input, args.output, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> None:
    report = api.build_dataset(args.tokenizer, args.input, args.output,
                               json_key=args.json_key, overwrite=args.overwrite)  # fmt: skip
    print(json.dumps(report.to_dict()), flush=True)
