"""Training checkpoints of a distillation run: ``OUT/checkpoints/step_NNNNNNN``.

Each one is a normal megatron-prune checkpoint of the student (``eval ppl`` and ``convert``
accept it) whose dist checkpoint also holds the optimizer state (Megatron's sharded optimizer
state, reshardable), plus ``trainer.json``: the step reached, the LR scheduler and the metrics
so far. The data position is the step itself (see :mod:`megatron_prune.data.training`), so
resuming from step k replays exactly what an uninterrupted run does after step k.

Checkpoints are written atomically (``step_N.partial`` renamed when every rank is done), so a
run killed while saving leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_prune import compat
from megatron_prune.checkpoint.atomic import atomic_directory, is_writer, write_text_atomic
from megatron_prune.checkpoint.megatron_io import (
    apply_model_state,
    load_sharded,
    prepare_save,
    save_model_checkpoint,
    sharded_model_state,
)
from megatron_prune.checkpoint.metadata import CheckpointMeta
from megatron_prune.checkpoint.sources import open_source, write_description

TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"step_(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps completed
    scheduler: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one metrics record per logged step


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:07d}"


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step (partial ones are never named step_N)."""
    found = [
        (int(m.group(1)), p)
        for p in (out / "checkpoints").glob("step_*")
        if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_FILE).is_file()
    ]
    return max(found)[1] if found else None


def _template(chunks: list[torch.nn.Module], optimizer, is_loading: bool) -> dict:
    """Model and optimizer state; the distributed optimizer's in model space (one tensor per
    parameter), so a checkpoint loads at another layout too (the format is the release's:
    compat.optimizer_sharded_state_dict)."""
    model = sharded_model_state(chunks)
    optim = compat.optimizer_sharded_state_dict(optimizer, model, is_loading)
    return {**model, "optimizer": optim}


def save_training_checkpoint(
    out: Path,
    chunks: list[torch.nn.Module],
    optimizer,
    state: TrainerState,
    meta: CheckpointMeta,
    tokenizer_from: Path,
    keep: int,
) -> Path:
    """Collective. ``chunks`` are the student's unwrapped GPTModel chunks; ``tokenizer_from`` a
    checkpoint whose tokenizer folder is copied. Keeps the newest ``keep`` checkpoints."""
    target = checkpoint_dir(out, state.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(target, overwrite=True) as scratch:
        prepare_save()
        dist_checkpointing.save(_template(chunks, optimizer, is_loading=False), str(scratch))
        if is_writer():
            _write_description(scratch, meta, tokenizer_from)
            write_text_atomic(scratch / TRAINER_FILE, json.dumps(state.__dict__, indent=1))
    if is_writer() and keep > 0:
        older = sorted(p for p in target.parent.glob("step_*") if _STEP_DIR.match(p.name))
        for stale in older[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def save_student(target: Path, chunks: list[torch.nn.Module], meta: CheckpointMeta,
                 tokenizer_from: Path) -> None:  # fmt: skip
    """Collective: the student alone, as a model checkpoint (no optimizer state) that
    Megatron-LM's ``--load`` takes too."""
    with atomic_directory(target, overwrite=True) as scratch:
        save_model_checkpoint(chunks, scratch, meta.arch, meta.layout)
        if is_writer():
            _write_description(scratch, meta, tokenizer_from)


def _write_description(directory: Path, meta: CheckpointMeta, tokenizer_from: Path) -> None:
    """What makes a dist checkpoint one of ours: metadata and the source's tokenizer."""
    write_description(directory, meta, open_source(str(tokenizer_from)))


def _inner_optimizers(optimizer) -> list:
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _materialize_optimizer_state(optimizer) -> None:
    """Give every parameter the (zero) Adam state a step would create, "step" included.

    The load template is built from the optimizer's current state; before the first step
    torch's Adam has none, and megatron-core's distributed optimizer reads a per-parameter
    "step" while building it (on machines without apex / Transformer Engine)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def _keep_step_on_load(optimizer) -> None:
    """Without apex / Transformer Engine, megatron-core's distributed optimizer restores "step"
    into each parameter's Adam state and then copies every state entry from the loaded
    per-parameter tensors, which hold no "step" (KeyError). Let entries the checkpoint does
    not hold per parameter keep their restored value."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states
        current = opt._get_main_param_and_optimizer_states

        def tolerant(model_param, tensors, original=original, current=current):
            return original(model_param, {**current(model_param), **tensors})

        opt._set_main_param_and_optimizer_states = tolerant


def _unshare_step_counters(optimizer) -> None:
    """megatron-core restores one "step" tensor into every parameter's state; torch's Adam
    increments each parameter's counter in place, so a shared one would advance once per
    parameter per step and skew the bias correction after a resume."""
    for inner in _inner_optimizers(optimizer):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def load_training_checkpoint(
    directory: Path, chunks: list[torch.nn.Module], optimizer
) -> TrainerState:
    """Collective: restore student weights and optimizer state; return the trainer state."""
    _materialize_optimizer_state(optimizer)
    loaded = load_sharded(_template(chunks, optimizer, is_loading=True), directory)
    apply_model_state(chunks, loaded, directory)
    _keep_step_on_load(optimizer)
    optimizer.load_state_dict(loaded["optimizer"])
    _unshare_step_counters(optimizer)
    data = json.loads((directory / TRAINER_FILE).read_text())
    return TrainerState(**data)
