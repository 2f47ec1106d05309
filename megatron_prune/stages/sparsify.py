"""``sparsify`` on the shards: each rank builds its share of the (dense-shaped) model and fills
it one source layer at a time, masking that layer's linear layers on the whole tensors before it
keeps its tensor-parallel shard, so the masks, and the output, are the same at every layout.
Peak memory per rank is its share of the model plus one source layer, as for ``prune``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_prune.checkpoint.metadata import CheckpointMeta
from megatron_prune.checkpoint.partial import WholeTensorReader, open_reader
from megatron_prune.checkpoint.sharding import fill_parameters
from megatron_prune.models.gpt import build_model
from megatron_prune.progress import progress_bar
from megatron_prune.stages.prune import fill_non_layer, local_layers, save_derived
from megatron_prune.surgery.masks import LINEARS, SparsityPlan, sparsify_layer


def _layer_norms(plan: SparsityPlan, layer: int, tensors: dict) -> dict | None:
    """Layer ``layer``'s input norms, cut to its own widths (the score tables are as wide as
    the widest layer; a narrower layer's columns come first)."""
    if plan.input_norms is None:
        return None
    return {
        key: plan.input_norms[key][layer, : tensors[name].shape[1]]
        for key, name in LINEARS.items()
    }


def sparsify_shards(
    reader: WholeTensorReader, plan: SparsityPlan, chunks: list[torch.nn.Module]
) -> None:
    """Fill this rank's chunks with the masked model, layer by layer."""
    for _, i in progress_bar(local_layers(chunks), desc="masking layers", unit="layer"):
        tensors = reader.read_layer(i)
        layer = sparsify_layer(tensors, plan.sparsities[i], plan.method,
                               _layer_norms(plan, i, tensors))  # fmt: skip
        del tensors
        fill_parameters(chunks, {f"decoder.layers.{i}.{n}": t for n, t in layer.items()})
    fill_non_layer(reader, chunks)


def write_sparsified(
    checkpoint: Path,
    meta: CheckpointMeta,
    plan: SparsityPlan,
    out: Path,
    layout_record: dict,
    scores_dir: Path | None,
    overwrite: bool,
) -> None:
    """Collective over every rank of the output layout: mask on the shards and save ``out``."""
    chunks = build_model(meta.arch, initialize=False, params_dtype=torch.float32)
    sparsify_shards(open_reader(checkpoint), plan, chunks)
    save_derived(chunks, checkpoint, meta.tokenizer, meta.arch, out, layout_record, overwrite,
                 scores=None if scores_dir is None else str(scores_dir),
                 sparsity=plan.record())  # fmt: skip
