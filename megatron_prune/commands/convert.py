"""``megatron-prune convert SRC DST``: GGUF / HF / Megatron in, Megatron (any TP x PP) or HF out."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_prune.checkpoint.atomic import atomic_directory, check_output, is_writer
from megatron_prune.checkpoint.metadata import CheckpointMeta, provenance
from megatron_prune.checkpoint.sources import TOKENIZER_DIR, Source, open_source
from megatron_prune.distributed import add_layout_args, initialize, layout_from_args
from megatron_prune.errors import UserError
from megatron_prune.log import log


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="gguf:FILE, a Hugging Face folder, or a megatron-prune checkpoint"
    )
    parser.add_argument("dst", help="output folder (written atomically)")
    parser.add_argument("--to", choices=["megatron", "hf"], default="megatron")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    add_layout_args(parser)


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp if args.to == "megatron" else 1


def validate(args: argparse.Namespace) -> Source:
    """Every check that needs no tensor: output, source, layout."""
    check_output(Path(args.dst), args.overwrite)
    source = open_source(args.src)
    layout = layout_from_args(args)
    if args.to == "hf" and layout.model_parallel_size != 1:
        raise UserError("--to hf writes whole tensors: leave --tp/--pp at 1")
    source.arch.check_layout(layout.tp, layout.pp, layout.vpp)
    return source


def run(args: argparse.Namespace) -> None:
    source = validate(args)
    if args.to == "hf":
        to_hf(source, Path(args.dst), args.overwrite)
    else:
        to_megatron(source, Path(args.dst), layout_from_args(args), args.overwrite, args.device)


def to_megatron(source: Source, dst: Path, layout, overwrite: bool, device: str | None) -> None:
    """Collective over tp*pp ranks: build the model at ``layout``, fill it, save it."""
    from megatron_prune.checkpoint.megatron_io import load_chunks, save_chunks
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
        save_chunks(chunks, scratch)
        if torch.distributed.get_rank() == 0:
            tokenizer = source.save_tokenizer(scratch / TOKENIZER_DIR)
            CheckpointMeta(
                arch=source.arch,
                layout=layout.to_dict(),
                tokenizer=tokenizer,
                provenance=provenance(f"{source.kind}:{source.path}"),
            ).write(scratch)
    log(f"wrote {dst}")


def to_hf(source: Source, dst: Path, overwrite: bool) -> None:
    """Whole tensors in one process: Megatron names -> the family's Hugging Face names."""
    from megatron_prune.checkpoint import hf
    from megatron_prune.models.weight_map import megatron_to_hf

    arch, family = source.arch, source.family
    if source.kind == "megatron":
        state = megatron_whole_state(source.path)
    else:
        state = source.megatron_state()
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


def megatron_whole_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a Megatron checkpoint at TP=1, PP=1 and return its whole tensors."""
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.distributed import ParallelLayout

    initialize(ParallelLayout())
    model = load_model(path)
    return {k: v for k, v in model.chunks[0].state_dict().items() if not k.endswith("_extra_state")}
