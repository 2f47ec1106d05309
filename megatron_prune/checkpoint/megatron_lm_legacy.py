"""Megatron-LM's legacy checkpoint format (``--ckpt-format torch``), read as whole tensors.

One ``torch.save`` file per model-parallel rank: ``iter_NNNNNNN/mp_rank_TT/model_optim_rng.pt``
(``mp_rank_TT_PPP`` with a pipeline), each holding Megatron-LM's ``args``, and the rank's
shard of the model as a plain ``state_dict`` (``model``, or ``model0``, ``model1``, ... with a
virtual pipeline). Unlike a dist checkpoint nothing records where a shard sits, so this module
puts them back together from the args:

* layers are numbered within their chunk: the chunk's offset in the model comes from the
  pipeline and virtual-pipeline ranks (Megatron-LM's uniform split);
* tensor-parallel shards are joined by ``sharding.join_shards`` (the inverse of the split the
  model uses) on the axis the module splits: column-parallel weights and the vocabulary on
  rows, row-parallel weights on columns;
* the standard specs' fused-norm names (``linear_qkv.layer_norm_weight``) map to ours.

The result is the whole-model, Megatron-named state that ``convert`` loads from GGUF and HF
sources too, and every other command loads a legacy checkpoint through it (``load_chunks``,
``LegacyReader`` for ``prune``): each rank reads the tensors it needs whole and takes its shard,
as from a Hugging Face source. Files are memory-mapped; each tensor is joined when asked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_prune.checkpoint.metadata import CheckpointError
from megatron_prune.checkpoint.partial import StoredTensor, WholeTensorReader
from megatron_prune.models.arch import ModelArch

_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
_CHECKPOINT_FILE = "model_optim_rng.pt"
# fused-norm names of megatron-core's standard specs -> the module names our model uses
_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_ROW_PARALLEL = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")
_COLUMN_PARALLEL = (
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
    "embedding.word_embeddings.weight", "output_layer.weight",
)  # fmt: skip


def rank_files(directory: Path) -> dict[tuple[int, int], Path]:
    """(tp rank, pp rank) -> the rank's file, for every ``mp_rank_*`` folder of ``directory``."""
    files = {}
    for sub in directory.iterdir():
        match = _RANK_DIR.match(sub.name)
        if match and (sub / _CHECKPOINT_FILE).is_file():
            files[(int(match.group(1)), int(match.group(2) or 0))] = sub / _CHECKPOINT_FILE
    return files


def is_legacy(directory: Path) -> bool:
    return directory.is_dir() and any(_RANK_DIR.match(p.name) for p in directory.iterdir())


def _load(path: Path) -> dict[str, Any]:
    """A rank's file, memory-mapped. It holds pickled Megatron-LM objects (args, RNG and
    optimizer state), so it is unpickled as Megatron-LM itself does: only load checkpoints
    you trust."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # truncated or not a torch file
        raise CheckpointError(f"{path}: cannot read it as a torch checkpoint ({err})") from err


def saved_args(directory: Path, load: Callable[[Path], dict[str, Any]] = _load) -> Any:
    """Megatron-LM's ``args`` of a legacy checkpoint (from its first rank's file, read with
    ``load``: a caller that keeps the files open passes its own cache)."""
    files = rank_files(directory)
    if not files:
        raise CheckpointError(f"{directory}: no mp_rank_*/{_CHECKPOINT_FILE} files")
    args = load(files[min(files)]).get("args")
    if args is None:
        raise CheckpointError(f"{files[min(files)]}: no Megatron-LM args, architecture unknown")
    return args


class LegacyTensors(Mapping[str, torch.Tensor]):
    """Whole fp32 tensors of a legacy checkpoint by our global names, joined on demand."""

    def __init__(self, directory: Path, arch: ModelArch) -> None:
        self.arch = arch
        self._states: dict[Path, dict[str, Any]] = {}
        args = saved_args(directory, self._state)
        tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
        pp = int(getattr(args, "pipeline_model_parallel_size", 1) or 1)
        vpp = int(getattr(args, "virtual_pipeline_model_parallel_size", None) or 1)
        for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            if getattr(args, name, None):
                raise CheckpointError(f"{directory}: uneven pipeline stages (--{name}) are "
                                      "not supported in the legacy format")  # fmt: skip
        files = rank_files(directory)
        expected = {(t, p) for t in range(tp) for p in range(pp)}
        if set(files) != expected:
            missing = sorted(expected - set(files))
            raise CheckpointError(
                f"{directory}: a TP={tp} x PP={pp} legacy checkpoint needs "
                f"{len(expected)} mp_rank_* files; missing or extra: {missing or sorted(files)}"
            )
        if arch.num_layers % (pp * vpp):
            raise CheckpointError(f"{arch.num_layers} layers do not split into PP={pp} x VPP={vpp}")
        per_chunk = arch.num_layers // (pp * vpp)
        self._tp = tp
        # name -> [(tp rank, file, key in the file's state dict)]
        self._where: dict[str, list[tuple[int, Path, tuple[str, str]]]] = {}
        for (t, p), path in sorted(files.items()):
            state = self._state(path)
            for v in range(vpp):
                model_key = "model" if vpp == 1 else f"model{v}"
                if model_key not in state:
                    raise CheckpointError(f"{path}: no {model_key!r} state")
                offset = v * (arch.num_layers // vpp) + p * per_chunk
                for key in state[model_key]:
                    if key.endswith("_extra_state"):
                        continue
                    name = self._global_name(key, offset)
                    if name == "output_layer.weight" and arch.tie_embeddings:
                        continue  # the last stage's copy of the tied embedding
                    self._where.setdefault(name, []).append((t, path, (model_key, key)))

    def _state(self, path: Path) -> dict[str, Any]:
        if path not in self._states:
            self._states[path] = _load(path)
        return self._states[path]

    @staticmethod
    def _global_name(key: str, offset: int) -> str:
        match = _LAYER.match(key)
        if match is None:
            return key
        rest = _NORM_NAMES.get(match.group(2), match.group(2))
        return f"decoder.layers.{int(match.group(1)) + offset}.{rest}"

    def _shards(self, name: str) -> list[torch.Tensor]:
        shards = sorted(self._where[name], key=lambda item: item[0])
        tensors = [self._state(path)[model_key][key] for _, path, (model_key, key) in shards]
        if len(tensors) > 1 and len(tensors) != self._tp:
            raise CheckpointError(f"{name}: {len(tensors)} shards for TP={self._tp}")
        return tensors

    @staticmethod
    def _split_dim(name: str) -> int | None:
        suffix = re.sub(r"^decoder\.layers\.\d+\.", "", name)
        # no modules here to ask (models/partition.py): the TP axis by name; norms replicated
        return 1 if suffix in _ROW_PARALLEL else 0 if suffix in _COLUMN_PARALLEL else None

    def shape(self, name: str) -> torch.Size:
        """The whole tensor's shape, from its shards' (nothing is joined)."""
        tensors = self._shards(name)
        dim = self._split_dim(name)
        if len(tensors) == 1 or dim is None:
            return tensors[0].shape
        shape = list(tensors[0].shape)
        shape[dim] *= len(tensors)
        return torch.Size(shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensors = [t.float() for t in self._shards(name)]
        if len(tensors) == 1 or self._tp == 1:
            return tensors[0]
        from megatron_prune.checkpoint.sharding import join_shards  # imports megatron-core

        return join_shards(tensors, self._split_dim(name), name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class LegacyReader(WholeTensorReader):
    """``partial.CheckpointReader``'s interface over a legacy checkpoint, so ``prune`` reads
    either format. A tensor is joined from its rank files when it is read; the files themselves
    are memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        from megatron_prune.checkpoint.megatron_lm_format import read_meta, tensor_directory

        self.directory = tensor_directory(path)
        self._tensors = LegacyTensors(self.directory, read_meta(path).arch)
        self.index = {name: StoredTensor(name, None, self._tensors.shape(name), torch.float32)
                      for name in self._tensors}  # fmt: skip

    def read(
        self, names: list[str], rows: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        self._check_known(names)
        out = {}
        for name in names:
            tensor = self._tensors[name]
            if rows and name in rows:
                start, stop = rows[name]
                tensor = tensor[start:stop].clone()
            out[name] = tensor
        return out


def is_legacy_checkpoint(path: str | Path) -> bool:
    """True for a Megatron-LM ``--save`` folder in the legacy per-rank format."""
    from megatron_prune.checkpoint.megatron_lm_format import is_megatron_lm_layout, tensor_directory

    return is_megatron_lm_layout(path) and is_legacy(tensor_directory(path))
