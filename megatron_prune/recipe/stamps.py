"""What a recipe step read and wrote, and whether that still holds.

A step's stamp (``WORKDIR/.stamps/RECIPE/NN_command.json``, written when the step succeeds)
holds its command line, a fingerprint of each input and output path, and what it printed. The
step is skipped on a rerun only while all of that still matches; a step that re-ran rewrites its
outputs, which changes the fingerprints of every later step that reads them, so dependants
re-run too. Fingerprints: a file up to ``HASH_LIMIT`` bytes by its SHA-256 (rewriting the same
text changes nothing), a larger file by size and modification time, a folder by the relative
path, size and modification time of every file in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_prune.checkpoint.atomic import write_text_atomic
from megatron_prune.recipe.load import Recipe, Step

STAMP_DIR = ".stamps"
STAMP_VERSION = 1
HASH_LIMIT = 8 << 20
# Scratch names our writers use (atomic.py) and folders no step reads.
_SCRATCH_SUFFIXES = (".partial", ".old", ".tmp")

# Which flags name paths a command reads / writes (flag names as in the recipe, "_" for "-").
INPUTS = {
    "convert": ("src", "tokenizer"),
    "eval": ("checkpoint", "data"),
    "generate": ("checkpoint",),
    "score": ("checkpoint", "data"),
    "plan": ("checkpoint", "scores", "data", "latency_table"),
    "prune": ("checkpoint", "scores", "target"),
    "sparsify": ("checkpoint", "scores"),
    "data": ("tokenizer", "input"),
    "distill": ("teacher", "student", "data", "eval_data"),
    "report": ("dirs",),
}
OUTPUTS = {
    "convert": ("dst",),
    "eval": ("out",),
    "score": ("out",),
    "plan": ("out",),
    "prune": ("out",),
    "sparsify": ("out",),
    "data": ("output",),
    "distill": ("out",),
    "report": ("out",),
}
PREFIX_FLAGS = {("data", "output"), ("distill", "data")}  # indexed datasets: PREFIX.bin/.idx


def _flag_paths(step: Step, names: tuple[str, ...]) -> list[Path]:
    paths: list[Path] = []
    for name in names:
        value = step.flags.get(name)
        if value in (None, False, True):
            continue
        for item in value if isinstance(value, list) else [value]:
            text = str(item)
            if (step.command, name) in PREFIX_FLAGS:
                try:
                    float(text)  # a blend weight, not a path
                    continue
                except ValueError:
                    paths += [Path(text + ".bin"), Path(text + ".idx")]
                    continue
            if step.command == "convert" and text.startswith("gguf:"):
                text = text[len("gguf:") :]
            paths.append(Path(text))
    return [p.absolute() for p in paths]


def inputs(step: Step) -> list[Path]:
    return _flag_paths(step, INPUTS.get(step.command, ()))


def outputs(step: Step) -> list[Path]:
    return _flag_paths(step, OUTPUTS.get(step.command, ()))


def _file_digest(path: Path, stat: os.stat_result) -> str:
    if stat.st_size > HASH_LIMIT:
        return f"stat:{stat.st_size}:{stat.st_mtime_ns}"
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _skipped(name: str) -> bool:
    return name == STAMP_DIR or name.endswith(_SCRATCH_SUFFIXES)


def fingerprint(path: Path, exclude: tuple[Path, ...] = ()) -> str:
    """A short text that changes when ``path`` (a file or a folder) changes; ``exclude``: paths
    inside a folder that do not count (a report's own output inside the folder it reads)."""
    if not path.exists():
        return "missing"
    if path.is_file():
        return _file_digest(path, path.stat())
    digest, count = hashlib.sha256(), 0
    for root, dirs, files in os.walk(path):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if not _skipped(d) and here / d not in exclude)
        for name in sorted(files):
            if _skipped(name) or here / name in exclude:
                continue
            stat = (here / name).stat()
            rel = (here / name).relative_to(path).as_posix()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
    return f"dir:{count}:{digest.hexdigest()}"


def fingerprints(paths: list[Path], exclude: tuple[Path, ...] = ()) -> dict[str, str]:
    return {str(p): fingerprint(p, exclude) for p in paths}


def stamp_path(recipe: Recipe, step: Step) -> Path:
    return recipe.workdir.absolute() / STAMP_DIR / recipe.path.stem / (
        f"{step.index:02d}_{step.command}.json"
    )


@dataclass
class Stamp:
    argv: list[str]
    inputs: dict[str, str]
    outputs: dict[str, str]
    stdout: str = ""
    seconds: float = 0.0

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"format_version": STAMP_VERSION, "argv": self.argv, "inputs": self.inputs,
                  "outputs": self.outputs, "stdout": self.stdout, "seconds": self.seconds}
        write_text_atomic(path, json.dumps(record, indent=2))  # fmt: skip

    @classmethod
    def read(cls, path: Path) -> Stamp | None:
        """The stamp at ``path``, or None when there is none (or it is unreadable: re-run)."""
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("format_version") != STAMP_VERSION:
            return None
        return cls(record["argv"], record["inputs"], record["outputs"], record.get("stdout", ""),
                   record.get("seconds", 0.0))  # fmt: skip


def why_run(step: Step, stamp: Stamp | None) -> str | None:
    """Why ``step`` must run, or None when its stamp still holds (skip it)."""
    if stamp is None:
        return "no record of a finished run"
    if stamp.argv != step.argv:
        return "its command line changed"
    outs = outputs(step)
    now = fingerprints(inputs(step), exclude=tuple(outs))
    for path, value in now.items():
        if stamp.inputs.get(path) != value:
            return f"input {path} changed"
    if set(now) != set(stamp.inputs):
        return "its inputs changed"
    for path in outs:
        if not path.exists():
            return f"output {path} is missing"
        if stamp.outputs.get(str(path)) != fingerprint(path):
            return f"output {path} changed since the step wrote it"
    return None
