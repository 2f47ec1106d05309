"""Parts of a Megatron dist checkpoint, by whole-model tensor name, read by this process alone.

``prune`` and ``convert --to hf`` need whole tensors (surgery selects arbitrary rows and columns),
but never all of them at once: one layer, or one tensor-parallel rank's block of embedding rows.
megatron-core's ``dist_checkpointing.load`` reads whatever region a ``ShardedTensor`` asks for,
but only as a collective over a world whose ranks together cover every fragment. This reader
asks torch DCP for arbitrary regions with ``no_dist=True``: no model, no parallel state, no
collective, so each rank reads its own layers in its own order.

Names are those of an unsharded GPTModel with global layer indices
(``decoder.layers.{i}.mlp.linear_fc1.weight``). A uniform model stores each layer tensor
stacked along a leading layer axis (key ``decoder.layers.mlp.linear_fc1.weight``, shape
[L, ...]); a per-layer (heterogeneous) model stores one key per layer. Both are indexed here.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_prune.errors import CheckpointError

_PER_LAYER_KEY = re.compile(r"^decoder\.layers\.\d+\.")
_STACKED_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class StoredTensor:
    """Where a whole-model tensor lives: its checkpoint key, its index on the stacked layer axis
    (None: not stacked) and its own shape and dtype."""

    key: str
    layer: int | None
    shape: torch.Size
    dtype: torch.dtype


class _RegionPlanner(DefaultLoadPlanner):
    """Reads each requested region of a stored tensor straight into its destination tensor."""

    def __init__(self, regions: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions  # request id -> (destination, global offsets)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for rid, (dest, offsets) in self.regions.items():
            stored = self.metadata.state_dict_metadata[rid.split("|")[0]]
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(rid.split("|")[0], stored, [chunk]):
                items.append(_tag(item, rid))
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.regions[index.fqn][0]


def read_index(directory: Path):
    """The DCP index (``.metadata``) of the dist checkpoint in ``directory``: every stored
    tensor's key, shape and chunks. No tensor is read."""
    try:
        return FileSystemReader(str(directory)).read_metadata()
    except Exception as err:  # a missing or truncated .metadata file
        raise CheckpointError(
            f"{directory}: cannot read the dist checkpoint's index ({err})"
        ) from err


def _tag(item, rid: str):
    """Point a read item's destination at request ``rid`` (two requests may read one key)."""
    from dataclasses import replace

    dest = replace(item.dest_index, fqn=rid)
    return replace(item, dest_index=dest)


def open_reader(directory: str | Path):
    """A reader of whole tensors for a dist checkpoint (``CheckpointReader``) or for Megatron-LM's
    legacy per-rank format (``LegacyReader``, same interface)."""
    from megatron_prune.checkpoint import megatron_lm_legacy

    if megatron_lm_legacy.is_legacy_checkpoint(directory):
        return megatron_lm_legacy.LegacyReader(directory)
    return CheckpointReader(directory)


class WholeTensorReader:
    """What ``prune`` asks of a checkpoint: an ``index`` of whole-model tensor names (with their
    shapes) and ``read(names, rows)``; the layer helpers are built on those two."""

    directory: Path
    index: dict[str, StoredTensor]

    def names(self) -> list[str]:
        return list(self.index)

    def layer_names(self, layer: int) -> list[str]:
        prefix = f"{_STACKED_PREFIX}{layer}."
        return [n for n in self.index if n.startswith(prefix)]

    def _check_known(self, names: list[str]) -> None:
        for name in names:
            if name not in self.index:
                raise CheckpointError(f"{self.directory}: no tensor {name!r} in the checkpoint")

    def read(
        self, names: list[str], rows: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def read_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Every tensor of source layer ``layer``, by layer-local name
        (``mlp.linear_fc1.weight``)."""
        prefix = f"{_STACKED_PREFIX}{layer}."
        return {n[len(prefix) :]: t for n, t in self.read(self.layer_names(layer)).items()}


class CheckpointReader(WholeTensorReader):
    """Whole tensors, or blocks of their rows, from a dist checkpoint written by this tool or by
    megatron-core, read on demand."""

    def __init__(self, directory: str | Path) -> None:
        from megatron_prune.checkpoint.megatron_lm_format import dist_checkpoint_directory

        self.directory = dist_checkpoint_directory(directory)
        metadata = read_index(self.directory)
        from megatron_prune.checkpoint.megatron_io import legacy_norm_key

        self.index: dict[str, StoredTensor] = {}
        for key, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                continue
            dtype = md.properties.dtype
            name_key = legacy_norm_key(key)  # model names: decoder.layers.{i}.input_layernorm
            if key.startswith(_STACKED_PREFIX) and not _PER_LAYER_KEY.match(key):
                rest = name_key[len(_STACKED_PREFIX) :]
                for i in range(md.size[0]):
                    name = f"{_STACKED_PREFIX}{i}.{rest}"
                    self.index[name] = StoredTensor(key, i, md.size[1:], dtype)
            else:
                self.index[name_key] = StoredTensor(key, None, md.size, dtype)

    def read(
        self, names: list[str], rows: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, torch.Tensor]:
        """The tensors ``names``; ``rows[name] = (start, stop)`` reads only those rows."""
        self._check_known(names)
        rows = rows or {}
        regions, out = {}, {}
        for name in names:
            stored = self.index[name]
            start, stop = rows.get(name, (0, stored.shape[0] if stored.shape else 0))
            shape = (stop - start, *stored.shape[1:]) if name in rows else tuple(stored.shape)
            dest = torch.empty(shape, dtype=stored.dtype)
            offsets = (start, *([0] * (len(stored.shape) - 1))) if stored.shape else ()
            if stored.layer is not None:
                regions[f"{stored.key}|{name}"] = (dest.unsqueeze(0), (stored.layer, *offsets))
            else:
                regions[f"{stored.key}|{name}"] = (dest, offsets)
            out[name] = dest
        if regions:
            self._load(regions)
        return out

    def _load(self, regions: dict[str, tuple[torch.Tensor, tuple[int, ...]]]) -> None:
        state = {rid: dest for rid, (dest, _) in regions.items()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a")
                dcp.load(state, checkpoint_id=str(self.directory),
                         planner=_RegionPlanner(regions), no_dist=True)  # fmt: skip
        except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
            raise CheckpointError(
                f"{self.directory}: cannot read the dist checkpoint, it is truncated or damaged "
                f"({type(err).__name__})"
            ) from err
