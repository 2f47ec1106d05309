"""Between whole (TP=1, PP=1) Megatron tensors and the shards one rank's model chunks hold.

Megatron tags every tensor-parallel parameter with ``partition_dim``; this module slices along
it. Two layouts need more than a contiguous slice:
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

from megatron_prune.models.weight_map import WeightMapError

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(chunk: torch.nn.Module, local_name: str) -> str:
    """``decoder.layers.{k}.x`` of this chunk -> ``decoder.layers.{global index}.x``."""
    m = _LAYER.match(local_name)
    if m is None:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[m.end():]


def shard(full: torch.Tensor, param: torch.Tensor, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's part of ``full`` for ``param``."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):  # every family here has a gated MLP
        gate, up = full.chunk(2, dim=dim)
        return torch.cat([gate.chunk(tp, dim=dim)[tp_rank], up.chunk(tp, dim=dim)[tp_rank]], dim=dim)
    return full.chunk(tp, dim=dim)[tp_rank]


def load_full_state(chunks: list[torch.nn.Module], full: Mapping[str, torch.Tensor]) -> None:
    """Copy whole Megatron tensors into this rank's chunks; every parameter must be covered."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        for local, param in chunk.named_parameters():
            name = global_name(chunk, local)
            source = name
            if name == "output_layer.weight" and name not in full:
                source = "embedding.word_embeddings.weight"  # tied: last stage keeps a copy
            if source not in full:
                raise WeightMapError(f"no source tensor for Megatron parameter {name!r}")
            piece = shard(full[source], param, name, tp_rank, tp)
            if piece.shape != param.shape:
                raise WeightMapError(
                    f"{name}: source shard {tuple(piece.shape)} != parameter {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(piece)
