"""Run a recipe's steps in order, each as ``python -m megatron_prune.cli ...``, skipping every
step whose stamp still holds (see :mod:`megatron_prune.recipe.stamps`)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_prune.errors import UserError
from megatron_prune.log import log
from megatron_prune.recipe import stamps
from megatron_prune.recipe.load import Recipe, Step


@dataclass
class RecipeResult:
    ran: list[int] = field(default_factory=list)  # step indices, 1-based
    skipped: list[int] = field(default_factory=list)
    reports: list[Path] = field(default_factory=list)  # report.md of each report step


def _call(argv: list[str]) -> tuple[int, str]:
    """Run one step; its stdout is shown as it comes and kept (replayed when it is skipped)."""
    proc = subprocess.Popen([sys.executable, "-m", "megatron_prune.cli", *argv],
                            stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return proc.wait(), "".join(lines)


def _pending_reason(step: Step, pending: dict[Path, int]) -> str | None:
    """--dry-run: a step reading what an earlier would-run step rewrites would run too."""
    for path in stamps.inputs(step):
        for out, index in pending.items():
            if path == out or out in path.parents or path in out.parents:
                return f"input {path} is rewritten by step {index}"
    return None


def run_recipe(recipe: Recipe, *, force: bool = False, dry_run: bool = False) -> RecipeResult:
    """Run (or, with ``dry_run``, only judge) every step; raise :class:`UserError` at the first
    step that fails. ``force``: ignore the stamps and run every step."""
    result = RecipeResult()
    pending: dict[Path, int] = {}
    n = len(recipe.steps)
    for step in recipe.steps:
        where = stamps.stamp_path(recipe, step)
        stamp = stamps.Stamp.read(where)
        reason = "--force" if force else stamps.why_run(step, stamp)
        if dry_run and reason is None:
            reason = _pending_reason(step, pending)
        if step.command == "report":
            result.reports.append(Path(step.flags["out"]).absolute() / "report.md")
        if reason is None:
            log(f"step {step.index}/{n} skipped (finished, inputs unchanged): {step.text}")
            sys.stdout.write(stamp.stdout)
            sys.stdout.flush()
            result.skipped.append(step.index)
            continue
        log(f"step {step.index}/{n} ({reason}): {step.text}")
        result.ran.append(step.index)
        if dry_run:
            pending.update(dict.fromkeys(stamps.outputs(step), step.index))
            continue
        where.unlink(missing_ok=True)
        outs = stamps.outputs(step)
        before = stamps.fingerprints(stamps.inputs(step), exclude=tuple(outs))
        started = time.perf_counter()
        code, stdout = _call(step.argv)
        if code != 0:
            raise UserError(f"step {step.index} ({step.command}) failed with exit code {code}")
        stamps.Stamp(step.argv, before, stamps.fingerprints(outs), stdout,
                     time.perf_counter() - started).write(where)  # fmt: skip
    return result
