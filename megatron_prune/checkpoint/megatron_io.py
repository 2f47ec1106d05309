"""Megatron distributed checkpoints (``megatron.core.dist_checkpointing``) of this tool's models.

A dist checkpoint stores global tensors with their shard offsets, so one written at TP=2 x PP=2
loads at any other layout: resharding is "load at the new layout, save". Besides the tensors a
checkpoint folder holds ``megatron_prune.json`` (architecture, layout, provenance) and
``tokenizer/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_prune import compat
from megatron_prune.checkpoint.metadata import CheckpointError, CheckpointMeta
from megatron_prune.models.arch import ModelArch


def sharded_model_state(chunks: list[torch.nn.Module]) -> dict:
    """Model chunks as dist-checkpoint state: key "model", or "model0", "model1", ... (VPP)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    state = {}
    for i, chunk in enumerate(chunks):
        with compat.virtual_stage(i):  # megatron-core 0.12 keys layers by the global stage
            state[f"model{i}"] = chunk.sharded_state_dict()
    return state


def save_chunks(
    chunks: list[torch.nn.Module], directory: Path, common: dict | None = None
) -> None:
    """Collective: every rank saves its shards (and ``common``, non-sharded state) into
    ``directory``."""
    prepare_save()
    dist_checkpointing.save({**sharded_model_state(chunks), **(common or {})}, str(directory))


def save_model_checkpoint(
    chunks: list[torch.nn.Module], directory: Path, arch: ModelArch, layout: dict
) -> None:
    """Collective: ``directory`` becomes a folder Megatron-LM's ``--load`` takes: the tracker
    file and ``release/``, a dist checkpoint whose common state holds Megatron-LM's args (when
    Megatron-LM can express the model). The caller writes megatron_prune.json beside them."""
    from megatron_prune.checkpoint.megatron_lm_format import RELEASE, common_state, write_tracker
    from megatron_prune.errors import UserError

    try:
        common = common_state(arch, layout)
    except UserError:  # sandwich norms, per-layer widths: no Megatron-LM args to give
        common = {}
    if torch.distributed.get_rank() == 0:
        (directory / RELEASE).mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    save_chunks(chunks, directory / RELEASE, common)
    if torch.distributed.get_rank() == 0:
        write_tracker(directory)


def prepare_save() -> None:
    """Call before every ``dist_checkpointing.save``: the writer's results queue and what older
    megatron-core releases need patched (:func:`megatron_prune.compat.fit_release`)."""
    _forked_results_queue()
    compat.fit_release()


def _forked_results_queue() -> None:
    """Give megatron-core's checkpoint writer its results queue from a forked manager.

    megatron-core (every release from 0.12 to 0.16) creates the queue on first save from a
    *spawned* multiprocessing manager: a fresh interpreter that re-imports the main module
    (about 3 s and 0.3-0.4 GB per rank, measured by tools/bench_memory.py). A forked manager
    serves the same queue at once and shares its pages with the rank.
    """
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def load_chunks(chunks: list[torch.nn.Module], directory: Path) -> None:
    """Collective: fill this rank's chunks from a dist checkpoint written at any layout, or from
    a legacy Megatron-LM checkpoint (its shards joined from the rank files)."""
    from megatron_prune.checkpoint import megatron_lm_legacy

    if megatron_lm_legacy.is_legacy_checkpoint(directory):
        from megatron_prune.checkpoint.megatron_lm_format import read_meta, tensor_directory
        from megatron_prune.checkpoint.sharding import load_full_state

        arch = read_meta(directory).arch
        load_full_state(chunks, megatron_lm_legacy.LegacyTensors(tensor_directory(directory), arch))
        return
    state = load_sharded(sharded_model_state(chunks), Path(directory))
    apply_model_state(chunks, state, Path(directory))


def load_sharded(template: dict, directory: Path) -> dict:
    """Collective: ``dist_checkpointing.load`` with errors that name the damaged checkpoint.
    ``directory`` may be a Megatron-LM ``--save`` folder (tracker file + ``iter_*/``)."""
    from megatron_prune.checkpoint.megatron_lm_format import dist_checkpoint_directory

    directory = dist_checkpoint_directory(directory)
    _use_stored_norm_keys(template, directory)
    try:
        return dist_checkpointing.load(template, str(directory))
    except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
        raise CheckpointError(
            f"{directory}: cannot load the dist checkpoint, it is truncated or damaged "
            f"({_root_cause(err)})"
        ) from err


def stored_keys(directory: Path) -> set[str]:
    """The tensor keys a dist checkpoint holds (from its index; no tensor is read)."""
    from megatron_prune.checkpoint.partial import read_index

    return set(read_index(directory).state_dict_metadata)


def legacy_norm_key(key: str) -> str:
    """A norm's key as checkpoints of this tool written before Megatron's key names:
    ``...self_attention.linear_qkv.layer_norm_weight`` -> ``...input_layernorm.weight``."""
    from megatron_prune.models.spec import NORM_CHECKPOINT_KEYS

    for ours, megatrons in NORM_CHECKPOINT_KEYS.items():
        prefix, _, name = key.rpartition(megatrons)
        if _ and "." not in name:
            return f"{prefix}{ours}{name}"
    return key


def _use_stored_norm_keys(template: dict, directory: Path) -> None:
    """Point norm entries at the keys the checkpoint has: older checkpoints of this tool
    stored the norms under their module names."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    stored = stored_keys(directory)

    def adapt(value):
        if isinstance(value, ShardedTensor) and value.key not in stored:
            old = legacy_norm_key(value.key)
            if old in stored:
                value.key = old
        return value

    dict_list_map_inplace(adapt, template)


def apply_model_state(chunks: list[torch.nn.Module], state: dict, directory: Path) -> None:
    """Copy loaded "model*" entries into the chunks; every tensor must have been found."""
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for chunk, key in zip(chunks, keys, strict=True):
        chunk.load_state_dict(state[key], strict=False)
        missing = [
            k for k in chunk.state_dict() if not k.endswith("_extra_state") and k not in state[key]
        ]
        if missing:
            raise CheckpointError(
                f"{directory}: tensors missing from the checkpoint: {missing[:3]}"
            )


def _root_cause(err: BaseException) -> str:
    """One line naming what failed; DCP wraps per-rank failures with their full tracebacks."""
    if isinstance(err, CheckpointException) and err.failures:
        failure = next(iter(err.failures.values()))
        if isinstance(failure, tuple):  # (exception, traceback frames)
            failure = failure[0]
        err = getattr(failure, "exc_value", failure)  # DCP's _WrappedException
    return f"{type(err).__name__}: {err}".rstrip(": ")


@dataclass
class LoadedModel:
    meta: CheckpointMeta
    chunks: list[torch.nn.Module]
    path: Path

    @property
    def arch(self) -> ModelArch:
        return self.meta.arch


def load_model(
    directory: str | Path,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    attention_backend: str = "auto",
    recompute_granularity: str | None = None,
) -> LoadedModel:
    """Build this rank's chunks for the checkpoint's architecture at the current parallel state
    and load them. Megatron's parallel state must already be initialised."""
    from megatron_prune.models.gpt import build_model

    meta = CheckpointMeta.read(directory)
    chunks = build_model(
        meta.arch,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        device=device,
        initialize=False,
        attention_backend=attention_backend,
        recompute_granularity=recompute_granularity,
    )
    load_chunks(chunks, Path(directory))
    return LoadedModel(meta=meta, chunks=chunks, path=Path(directory))
