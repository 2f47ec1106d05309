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
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

from megatron_prune.models.weight_map import WeightMapError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(chunk: torch.nn.Module, local_name: str) -> str:
    """``decoder.layers.{k}.x`` of this chunk -> ``decoder.layers.{global index}.x``."""
    m = _LAYER.match(local_name)
    if m is None:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end() :]


def partition_dim(module: torch.nn.Module, param_name: str) -> int | None:
    """The TP-split axis of ``module``'s own parameter ``param_name`` (None: replicated)."""
    if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
        return 0
    if isinstance(module, RowParallelLinear) and param_name == "weight":
        return 1
    return None


def shard(full: torch.Tensor, dim: int | None, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of ``full``, split on axis ``dim`` (None: replicated)."""
    if dim is None or tp == 1:
        return full
    if name.endswith("mlp.linear_fc1.weight"):  # every family here has a gated MLP
        gate, up = full.chunk(2, dim=dim)
        return torch.cat(
            [gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim
        )
    return full.chunk(tp, dim=dim)[tp_rank]


def parameters_with_split(chunk: torch.nn.Module):
    """(qualified name, parameter, TP axis) for every parameter of ``chunk``."""
    for module_name, module in chunk.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            yield name, param, partition_dim(module, param_name)


def load_full_state(chunks: list[torch.nn.Module], full: Mapping[str, torch.Tensor]) -> None:
    """Fill this rank's chunks from whole Megatron tensors; every parameter must be covered.
    Parameters may share storage with ``full`` afterwards: treat ``full`` as handed over."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for local, param, dim in parameters_with_split(chunk):
            name = global_name(chunk, local)
            source = name
            if name == "output_layer.weight" and name not in full:
                source = "embedding.word_embeddings.weight"  # tied: last stage keeps a copy
            if source not in full:
                raise WeightMapError(f"no source tensor for Megatron parameter {name!r}")
            piece = shard(full[source], dim, name, tp_rank, tp)
            if piece.shape != param.shape:
                raise WeightMapError(
                    f"{name}: source shard {tuple(piece.shape)} != parameter {tuple(param.shape)}"
                )
            # Adopt the shard's storage instead of copying it when it already has the parameter's
            # dtype and device (whole tensors at TP=1): conversion moves each byte once.
            param.data = piece.to(device=param.device, dtype=param.dtype).contiguous()
