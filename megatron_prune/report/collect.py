"""Find what finished stages left in run folders, by the files each stage writes:

* a checkpoint: ``megatron_prune.json`` (architecture; a pruned one also its source
  architecture, kept layers, target and options);
* a score folder: ``meta.json`` + ``scores.safetensors``;
* a distillation run: ``metrics.jsonl`` (``student/`` inside it is a checkpoint);
* a plan: a YAML file with a ``plan:`` record;
* a perplexity: the JSON file of ``eval ppl --out``;
* a Hugging Face export: ``config.json`` + ``*.safetensors``.

Only metadata is read here (scores stay on disk until a heatmap needs them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_prune.errors import UserError

MAX_DEPTH = 4
# Folders no stage's result lives in: scratch, resumable training state, logger output.
_SKIP_DIRS = {"checkpoints", "tensorboard", "wandb", "tokenizer", "release", "__pycache__"}
_SKIP_SUFFIXES = (".partial", ".old", ".tmp")


@dataclass
class Checkpoint:
    path: Path
    arch: Any  # ModelArch
    provenance: dict[str, Any]
    params: int
    block_params: int

    @property
    def pruned(self) -> bool:
        return "source_arch" in self.provenance


@dataclass
class ScoreFolder:
    path: Path
    meta: dict[str, Any]

    @property
    def tensors_file(self) -> Path:
        from megatron_prune.importance.scoring import SCORES_FILE

        return self.path / SCORES_FILE


@dataclass
class DistillRun:
    path: Path
    history: list[dict[str, Any]]
    config: dict[str, Any]  # the student's provenance record of the run, when written


@dataclass
class PlanFile:
    path: Path
    text: str
    record: dict[str, Any]


@dataclass
class EvalResult:
    path: Path
    record: dict[str, Any]


@dataclass
class RunContents:
    dirs: list[Path]
    checkpoints: list[Checkpoint] = field(default_factory=list)
    scores: list[ScoreFolder] = field(default_factory=list)
    distills: list[DistillRun] = field(default_factory=list)
    plans: list[PlanFile] = field(default_factory=list)
    evals: list[EvalResult] = field(default_factory=list)
    exports: list[Path] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.checkpoints or self.scores or self.distills or self.plans or self.evals
                    or self.exports)  # fmt: skip

    def missing(self) -> list[str]:
        """What a full run has and these folders lack, one line each."""
        lines = []
        if not self.evals:
            lines.append("perplexities: no `eval ppl --out FILE.json` result")
        if not any(c.pruned for c in self.checkpoints):
            lines.append("kept widths: no pruned checkpoint (`prune --out`)")
        if not self.scores:
            lines.append("importance heatmaps: no score folder (`score --out`)")
        if not self.distills:
            lines.append("distillation curves: no distillation run (`distill --out`)")
        elif not any("eval_ppl" in r for d in self.distills for r in d.history):
            lines.append("held-out curve: the distillation run(s) had no `--eval-data`")
        if not self.plans and not any(c.pruned for c in self.checkpoints):
            lines.append("plan: no plan file (`plan --out`) and no pruned checkpoint's target")
        return lines


def _checkpoint(path: Path) -> Checkpoint | None:
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.errors import CheckpointError
    from megatron_prune.plan.cost import block_params, model_params

    try:
        meta = CheckpointMeta.read(path)
    except (CheckpointError, ValueError, KeyError):
        return None  # not ours or unreadable: listed nowhere
    return Checkpoint(path, meta.arch, meta.provenance, model_params(meta.arch),
                      block_params(meta.arch))  # fmt: skip


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _history(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed run
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _file(path: Path, found: RunContents) -> None:
    from megatron_prune.evaluate.results import RESULT_KIND

    if path.suffix in (".yaml", ".yml"):
        try:
            text = path.read_text()
            data = yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return
        if isinstance(data, dict) and isinstance(data.get("plan"), dict):
            found.plans.append(PlanFile(path, text, data["plan"]))
    elif path.suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and data.get("kind") == RESULT_KIND:
            found.evals.append(EvalResult(path, data))


def _folder(path: Path, names: set[str], found: RunContents) -> bool:
    """Classify one folder; True when its sub-folders may hold more results."""
    from megatron_prune.checkpoint.metadata import METADATA_FILE
    from megatron_prune.importance.scoring import META_FILE, SCORES_FILE

    if "metrics.jsonl" in names:
        student = _checkpoint(path / "student") if (path / "student").is_dir() else None
        config = (student.provenance.get("distillation") or {}) if student else {}
        found.distills.append(DistillRun(path, _history(path / "metrics.jsonl"), config))
        return True
    if METADATA_FILE in names:
        checkpoint = _checkpoint(path)
        if checkpoint is not None:
            found.checkpoints.append(checkpoint)
        return False
    if SCORES_FILE in names and META_FILE in names:
        meta = _read_json(path / META_FILE)
        if isinstance(meta, dict):
            found.scores.append(ScoreFolder(path, meta))
        return False
    if "config.json" in names and any(n.endswith(".safetensors") for n in names):
        found.exports.append(path)
        return False
    return True


def collect(dirs: list[str | Path], exclude: Path | None = None) -> RunContents:
    """Everything the stages left under ``dirs`` (folders or single files), ``exclude`` (the
    report's own folder) left out. Each path is reported once, in a stable order."""
    found = RunContents([Path(d) for d in dirs])
    seen: set[Path] = set()
    skip = exclude.resolve() if exclude else None
    for top in found.dirs:
        if not top.exists():
            raise UserError(f"report: {top} does not exist")
        if top.is_file():
            if top.resolve() not in seen:
                seen.add(top.resolve())
                _file(top, found)
            continue
        for root, subdirs, files in os.walk(top):
            here = Path(root)
            real = here.resolve()
            if real in seen or real == skip:
                subdirs[:] = []
                continue
            seen.add(real)
            descend = _folder(here, set(files) | set(subdirs), found)
            depth = len(here.relative_to(top).parts)
            if not descend or depth >= MAX_DEPTH:
                subdirs[:] = []
            else:
                subdirs[:] = sorted(d for d in subdirs if d not in _SKIP_DIRS
                                    and not d.startswith(".") and not d.endswith(_SKIP_SUFFIXES))
            for name in sorted(files):
                if (here / name).resolve() not in seen:
                    seen.add((here / name).resolve())
                    _file(here / name, found)
    return found
