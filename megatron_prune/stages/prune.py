"""``prune`` on the shards: each rank builds only its share of the pruned model and reads, one
source layer at a time, only the tensors its own layers are made from.

The surgery plan (which layers, groups, heads, neurons and channels survive) depends on scores
and shapes alone; rank 0 computes it and every rank receives the same plan. Each rank then, for
each layer of its pipeline stage(s), reads the whole source layer(s) from the dist checkpoint
(non-collectively: ``checkpoint.partial``), applies the pure per-layer surgery and keeps only its
tensor-parallel shard. The embedding and output layer are read as this rank's block of
vocabulary rows. Peak memory per rank is its share of the pruned model plus one source layer
(or one block of embedding rows); the result is the same tensors ``surgery.prune_model`` gives on
the whole model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megatron_prune.checkpoint.atomic import atomic_directory
from megatron_prune.checkpoint.megatron_io import save_model_checkpoint
from megatron_prune.checkpoint.metadata import CheckpointMeta, provenance
from megatron_prune.checkpoint.partial import WholeTensorReader, open_reader
from megatron_prune.checkpoint.sharding import fill_parameters, parameter_names, tp_rows
from megatron_prune.checkpoint.sources import open_source, write_description
from megatron_prune.log import log
from megatron_prune.models.arch import ModelArch
from megatron_prune.models.gpt import build_model
from megatron_prune.progress import progress_bar
from megatron_prune.surgery.prune import PruneOptions, SurgeryPlan, prune_layer, prune_other
from megatron_prune.surgery.state import EMBEDDING, OUTPUT

_VOCAB_ROWS = (EMBEDDING, OUTPUT)


def broadcast_plan(plan: object) -> object:
    """Rank 0's plan (or its refusal) on every rank: the plan is a few kilobytes of indices."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return plan
    box = [plan]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def local_layers(chunks: list[torch.nn.Module]) -> list[tuple[int, int]]:
    """(chunk index, global layer index) of every layer this rank holds."""
    return [
        (c, layer.layer_number - 1)
        for c, chunk in enumerate(chunks)
        for layer in chunk.decoder.layers
    ]


def prune_shards(
    reader: WholeTensorReader, plan: SurgeryPlan, chunks: list[torch.nn.Module]
) -> None:
    """Fill this rank's chunks of the pruned model, layer by layer, from the source checkpoint."""
    local = local_layers(chunks)
    for _, k in progress_bar(local, desc="pruning layers", unit="layer"):
        sources = {i: reader.read_layer(i) for i in plan.layers[k].sources}
        layer = prune_layer(plan, k, sources)
        del sources
        fill_parameters(chunks, {f"decoder.layers.{k}.{n}": t for n, t in layer.items()})
    fill_non_layer(reader, chunks, lambda other: prune_other(plan, other))


def fill_non_layer(
    reader: WholeTensorReader,
    chunks: list[torch.nn.Module],
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t,
) -> None:
    """Fill this rank's embedding, final norm and output layer from the source, through
    ``transform`` (the embedding and output layer as this rank's block of vocabulary rows)."""
    wanted = {n for n in parameter_names(chunks) if not n.startswith("decoder.layers.")}
    if OUTPUT in wanted and OUTPUT not in reader.index:
        wanted = (wanted - {OUTPUT}) | {EMBEDDING}  # tied: the last stage's copy of the embedding
    names = sorted(n for n in wanted if n in reader.index)
    rows = {n: tp_rows(reader.index[n].shape[0]) for n in names if n in _VOCAB_ROWS}
    other = transform(reader.read(names, rows))
    filled = fill_parameters(chunks, other, already_sharded=frozenset(rows))
    missing = {n for n in parameter_names(chunks) - filled if not n.startswith("decoder.layers.")}
    if missing:
        raise RuntimeError(f"pruned parameters left unfilled: {sorted(missing)[:3]}")


def write_pruned(
    checkpoint: Path,
    meta: CheckpointMeta,
    plan: SurgeryPlan,
    out: Path,
    layout_record: dict,
    options: PruneOptions,
    target_record: dict,
    scores_dir: Path,
    overwrite: bool,
    params_dtype: torch.dtype = torch.float32,
) -> None:
    """Collective over every rank of the output layout: prune on the shards and save ``out``."""
    chunks = build_model(plan.arch, initialize=False, params_dtype=params_dtype)
    prune_shards(open_reader(checkpoint), plan, chunks)
    save_derived(chunks, checkpoint, meta.tokenizer, plan.arch, out, layout_record, overwrite,
                 scores=str(scores_dir), target=target_record, options=asdict(options),
                 source_arch=meta.arch.to_dict(), kept_layers=plan.kept,
                 dropped_layers=plan.dropped,
                 clap_donors={str(k): v for k, v in plan.donors.items()})  # fmt: skip


def save_derived(chunks: list[torch.nn.Module], checkpoint: Path, tokenizer: dict[str, Any],
                 arch: ModelArch, out: Path, layout_record: dict, overwrite: bool,
                 **how: Any) -> None:  # fmt: skip
    """Collective: save the model made from ``checkpoint`` to ``out`` atomically, with its
    description (``how`` it was made goes into the provenance) and the source's tokenizer."""
    with atomic_directory(out, overwrite) as scratch:
        save_model_checkpoint(chunks, scratch, arch, layout_record)
        if torch.distributed.get_rank() == 0:
            description = CheckpointMeta(arch=arch, layout=layout_record, tokenizer=tokenizer,
                                         provenance=provenance(f"megatron:{checkpoint}", **how))
            write_description(scratch, description, open_source(str(checkpoint)))
    log(f"wrote {out}")
