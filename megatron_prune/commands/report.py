"""``megatron-prune report DIR [DIR ...] --out REPORT_DIR``: a markdown report with PNG plots
from finished run folders (no model is loaded; it runs in the launcher process)."""

from __future__ import annotations

import argparse

from megatron_prune import api

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run folders (a recipe's workdir, or single stage outputs)")
    parser.add_argument("--out", required=True,
                        help="report folder: report.md and its PNGs (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def world_size_needed(args: argparse.Namespace) -> int:
    return 1


def validate(args: argparse.Namespace) -> None:
    api.check_report(args.dirs, args.out, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> None:
    path = api.report(args.dirs, args.out, overwrite=args.overwrite)
    print(f"report: {path}", flush=True)
