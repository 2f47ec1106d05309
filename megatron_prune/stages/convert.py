"""``convert``: any source (GGUF, Hugging Face, Megatron) to a Megatron dist checkpoint at any
TP x PP, or to a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_prune.checkpoint.atomic import atomic_directory, is_writer
from megatron_prune.checkpoint.metadata import CheckpointMeta, provenance
from megatron_prune.checkpoint.partial import open_reader
from megatron_prune.checkpoint.sources import Source, write_description
from megatron_prune.distributed import ParallelLayout, initialize
from megatron_prune.log import log


def whole_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Every whole tensor of a Megatron dist checkpoint, by whole-model name, read by this
    process alone: no model is built and Megatron's parallel state is left as it is."""
    reader = open_reader(checkpoint)
    return reader.read(reader.names())


def to_megatron(
    source: Source, dst: Path, layout: ParallelLayout, overwrite: bool, device: str | None
) -> None:
    """Collective over tp*pp ranks: build the model at ``layout``, fill it, save it."""
    from megatron_prune.checkpoint.megatron_io import load_chunks, save_model_checkpoint
    from megatron_prune.checkpoint.sharding import load_full_state
    from megatron_prune.models.gpt import build_model

    initialize(layout, device)
    chunks = build_model(source.arch, initialize=False)
    log(f"reading {source.kind} source {source.path}")
    if source.kind == "megatron":
        load_chunks(chunks, source.path)
    else:
        load_full_state(chunks, source.megatron_state())
    with atomic_directory(dst, overwrite) as scratch:
        log(f"writing Megatron dist checkpoint at TP={layout.tp} PP={layout.pp}")
        save_model_checkpoint(chunks, scratch, source.arch, layout.to_dict())
        if torch.distributed.get_rank() == 0:
            meta = CheckpointMeta(
                arch=source.arch, layout=layout.to_dict(),
                provenance=provenance(f"{source.kind}:{source.path}"),
            )
            write_description(scratch, meta, source)
    log(f"wrote {dst}")


def to_hf(source: Source, dst: Path, overwrite: bool) -> None:
    """Whole tensors in one process: Megatron names -> the family's Hugging Face names."""
    from megatron_prune.checkpoint import hf
    from megatron_prune.models.weight_map import megatron_to_hf

    arch, family = source.arch, source.family
    state = whole_state(source.path) if source.kind == "megatron" else source.megatron_state()
    tensors = megatron_to_hf(state, family.rules(arch), arch)
    with atomic_directory(dst, overwrite) as scratch:
        if is_writer():  # every rank holds the same whole tensors; one writes them
            hf.write_folder(scratch, family.write_hf_config(arch), tensors)
            tokenizer_dir = scratch / "tokenizer.tmp"
            if source.save_tokenizer(tokenizer_dir):
                for f in tokenizer_dir.iterdir():
                    f.rename(scratch / f.name)
            if tokenizer_dir.exists():
                tokenizer_dir.rmdir()
    log(f"wrote {dst}")
