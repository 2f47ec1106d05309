"""``megatron-prune <command>``: the command line.

Every command accepts ``--nproc-per-node N`` and then re-launches itself under torchrun with N
processes. A command whose layout needs more ranks than it was started with (``convert --tp 2``
from a plain shell) re-launches itself the same way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys

COMMANDS = {
    "convert": "Convert GGUF / Hugging Face / Megatron checkpoints, at any TP x PP",
    "eval": "Evaluate a checkpoint (ppl: perplexity on a text file)",
    "generate": "Greedy generation from a prompt",
    "score": "Importance scores from calibration activations, at any layout",
    "prune": "Structured pruning (width, depth, CLAP, SLNP, norm absorption)",
    "data": "Build Megatron indexed datasets (data build) with a checkpoint's tokenizer",
    "distill": "Online full-vocabulary logit distillation (teacher and student, one layout)",
    "run": "Run a YAML recipe (a list of the commands above)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"megatron_prune.commands.{name}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--nproc-per-node",
            type=int,
            default=None,
            help="re-launch under torchrun with this many processes on this node",
        )
        module.add_arguments(cmd)
        cmd.set_defaults(module=module)
    return parser


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run this command again under ``torch.distributed.run`` with ``nproc`` local processes."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "megatron_prune.cli",
        *_strip_nproc(argv),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    in_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
    try:
        if not in_torchrun:
            # Bad input is reported here, once, before any process is spawned.
            getattr(args.module, "validate", lambda a: None)(args)
            needed = getattr(args.module, "world_size_needed", lambda a: 1)(args)
            nproc = args.nproc_per_node or (needed if needed > 1 else None)
            if nproc:
                return relaunch(nproc, argv)
        args.module.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as err:
        # Bad input: one clear line, no traceback, non-zero exit.
        if os.environ.get("MEGATRON_PRUNE_DEBUG") == "1":
            raise
        print(f"megatron-prune {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
