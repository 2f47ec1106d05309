"""Between whole (TP=1, PP=1) Megatron tensors and the shards one rank's model chunks hold.

Which axis a parameter is split on follows from its module's type (Megatron only tags parameters
it initialises, so the tags are absent when loading skips initialisation):
vocab-parallel embeddings and column-parallel linears split rows (axis 0), row-parallel linears
split the weight's columns (axis 1) and replicate the bias. Two layouts need more than a
contiguous slice:
* gated FC1 is [W_gate; W_up]: rank r holds [W_gate_r; W_up_r], one slice of each half;
* QKV is grouped by query group (see ``FuseQKV``), so a contiguous slice is whole groups: plain.
Layer names are local to a pipeline stage (``decoder.layers.0`` is the stage's first layer);
whole tensors are named by global layer index.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from megatron.core import parallel_state

from megatron_prune.models.partition import partition_dim
from megatron_prune.models.weight_map import WeightMapError

# Vocabulary tables: a source that can read a block of rows gives each rank only its own.
_VOCAB_TABLES = ("embedding.word_embeddings.weight", "output_layer.weight")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(chunk: torch.nn.Module, local_name: str) -> str:
    """``decoder.layers.{k}.x`` of this chunk -> ``decoder.layers.{global index}.x``."""
    m = _LAYER.match(local_name)
    if m is None:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end() :]


def _is_gated_fc1(name: str) -> bool:
    """Every family here has a gated MLP: rank r's fc1 holds [gate_r; up_r], not a slice."""
    return name.endswith("mlp.linear_fc1.weight")


def shard(full: torch.Tensor, dim: int | None, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of ``full``, split on axis ``dim`` (None: replicated)."""
    if dim is None or tp == 1:
        return full
    if _is_gated_fc1(name):
        gate, up = full.chunk(2, dim=dim)
        return torch.cat(
            [gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim
        )
    return full.chunk(tp, dim=dim)[tp_rank]


def join_shards(shards: list[torch.Tensor], dim: int | None, name: str) -> torch.Tensor:
    """The whole tensor of every TP rank's ``shard`` (rank order), the inverse of :func:`shard`."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if _is_gated_fc1(name):
        gates, ups = zip(*(t.chunk(2, dim=dim) for t in shards), strict=True)
        return torch.cat([*gates, *ups], dim=dim)
    return torch.cat(shards, dim=dim)


def parameters_with_split(chunk: torch.nn.Module):
    """(qualified name, parameter, TP axis) for every parameter of ``chunk``."""
    for module_name, module in chunk.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            yield name, param, partition_dim(module, param_name)


def tp_rows(rows: int) -> tuple[int, int]:
    """This rank's block ``(start, stop)`` of ``rows`` rows split over tensor parallelism."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return rank * rows // tp, (rank + 1) * rows // tp


def fill_parameters(
    chunks: list[torch.nn.Module],
    whole: Mapping[str, torch.Tensor],
    already_sharded: frozenset[str] = frozenset(),
) -> set[str]:
    """Fill the parameters of this rank's chunks that ``whole`` (global names) holds; return the
    names filled. Tensors named in ``already_sharded`` are this rank's shard already. Parameters
    may share storage with ``whole`` afterwards: treat it as handed over."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    filled = set()
    for chunk in chunks:
        for local, param, dim in parameters_with_split(chunk):
            name = global_name(chunk, local)
            source = name
            if name == "output_layer.weight" and name not in whole:
                source = "embedding.word_embeddings.weight"  # tied: last stage keeps a copy
            if source not in whole:
                continue
            if source in already_sharded:
                piece = whole[source]
            elif tp > 1 and dim == 0 and source in _VOCAB_TABLES and hasattr(whole, "rows"):
                start = tp_rank * param.shape[0]  # this rank's vocabulary rows only
                piece = whole.rows(source, start, start + param.shape[0])
            else:
                piece = shard(whole[source], dim, name, tp_rank, tp)
            if piece.shape != param.shape:
                raise RuntimeError(
                    f"{name}: shard {tuple(piece.shape)} != parameter {tuple(param.shape)}"
                )
            # Adopt the shard's storage instead of copying it when it already has the parameter's
            # dtype and device (whole tensors at TP=1): conversion moves each byte once. A view
            # into a larger whole tensor is copied, or the parameter would keep the whole alive.
            piece = piece.to(device=param.device, dtype=param.dtype).contiguous()
            if piece.untyped_storage().nbytes() > piece.nbytes:
                piece = piece.clone()
            param.data = piece
            filled.add(name)
    return filled


def parameter_names(chunks: list[torch.nn.Module]) -> set[str]:
    """Global names of every parameter of this rank's chunks."""
    return {global_name(c, local) for c in chunks for local, _, _ in parameters_with_split(c)}


def load_full_state(chunks: list[torch.nn.Module], full: Mapping[str, torch.Tensor]) -> None:
    """Fill this rank's chunks from whole Megatron tensors; every parameter must be covered."""
    missing = parameter_names(chunks) - fill_parameters(chunks, full)
    if missing:
        raise WeightMapError(f"no source tensor for Megatron parameters {sorted(missing)[:3]}")
