"""``megatron-prune run RECIPE.yaml [--workdir DIR] [--set NAME=VALUE] [--dry-run] [--force]``:
run a recipe, i.e. a list of subcommands (the format: :mod:`megatron_prune.recipe.load`).

Every step's flags are parsed before the first step runs. Each step that finishes leaves a
stamp under ``WORKDIR/.stamps/``; a rerun skips a step while its command line, its inputs and
its outputs are what the stamp recorded (replaying what it printed), and runs it again
otherwise, so a changed input re-runs the steps that read it and every step after them that
reads their outputs (:mod:`megatron_prune.recipe.stamps`). ``--dry-run`` says which steps
would run and why, and runs none; ``--force`` runs every step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_prune.log import log

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe (see configs/)")
    parser.add_argument("--workdir", default=".cache/recipes",
                        help="value of ${workdir}; also holds the step stamps")  # fmt: skip
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--dry-run", action="store_true",
                        help="print which steps would run, and why, without running them")
    parser.add_argument("--force", action="store_true", help="run every step, finished or not")


def run(args: argparse.Namespace) -> None:
    from megatron_prune.recipe.load import load_recipe
    from megatron_prune.recipe.runner import run_recipe

    recipe = load_recipe(Path(args.recipe), args.set, args.workdir)
    result = run_recipe(recipe, force=args.force, dry_run=args.dry_run)
    verb = "would run" if args.dry_run else "ran"
    log(f"recipe {recipe.path.name}: {verb} {len(result.ran)} step(s), skipped "
        f"{len(result.skipped)} finished one(s)")  # fmt: skip
    for report in result.reports:
        if report.is_file():
            print(f"report: {report}", flush=True)
