"""``megatron-prune prune CKPT --scores DIR --target TARGET.yaml --out OUT``: structured pruning
with re-initialisation (CLAP, SLNP, Post-RMSNorm absorption), written at any layout."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_prune.commands.common import add_checkpoint_args, world_size_needed
from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_args(parser)
    parser.add_argument("--scores", required=True, help="a folder written by `score`")
    parser.add_argument("--target", required=True, help="target architecture (YAML)")
    parser.add_argument("--out", required=True, help="pruned checkpoint folder (atomic)")
    parser.add_argument("--clap", action="store_true", help="Cross-Layer Attention Pruning")
    parser.add_argument("--slnp", action="store_true", help="Stabilized LayerNorm Pruning")
    parser.add_argument("--absorb-post-norms", action="store_true",
                        help="fold sandwich post-norms into the output projections")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true")
    for unit, default in (("channel", "channel/l1"), ("head", "head/l2"),
                          ("neuron", "neuron/l2"), ("layer", "layer/block_influence")):  # fmt: skip
        parser.add_argument(f"--{unit}-score", default=default,
                            help=f"which score ranks {unit}s (default: %(default)s)")  # fmt: skip


def _options(args: argparse.Namespace):
    from megatron_prune.surgery.prune import PruneOptions

    return PruneOptions(
        clap=args.clap, slnp=args.slnp, absorb_post_norms=args.absorb_post_norms,
        channel_score=args.channel_score, head_score=args.head_score,
        neuron_score=args.neuron_score, layer_score=args.layer_score,
    )  # fmt: skip


def validate(args: argparse.Namespace):
    """Everything that needs no weights: checkpoint, scores, target at the output layout."""
    from megatron_prune.checkpoint.atomic import check_output
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.importance.scoring import load_scores
    from megatron_prune.surgery.prune import check_scores
    from megatron_prune.surgery.target import load_target

    check_output(Path(args.out), args.overwrite)
    meta = CheckpointMeta.read(args.checkpoint)
    if not Path(args.target).is_file():
        raise UserError(f"--target {args.target} does not exist")
    target = load_target(args.target, meta.arch, args.tp, args.pp)
    scores = load_scores(args.scores, meta.arch)
    check_scores(scores, meta.arch, target, _options(args))
    return meta, target, scores


def run(args: argparse.Namespace) -> None:
    from megatron_prune.checkpoint.atomic import atomic_directory
    from megatron_prune.checkpoint.megatron_io import save_chunks
    from megatron_prune.checkpoint.metadata import CheckpointMeta, provenance
    from megatron_prune.checkpoint.sharding import load_full_state
    from megatron_prune.checkpoint.sources import TOKENIZER_DIR
    from megatron_prune.commands.convert import megatron_whole_state
    from megatron_prune.distributed import initialize, layout_from_args
    from megatron_prune.log import log
    from megatron_prune.models.gpt import build_model
    from megatron_prune.surgery.prune import prune_model

    meta, target, scores = validate(args)
    options = _options(args)
    whole = megatron_whole_state(Path(args.checkpoint))  # every rank: whole tensors (TP=1)
    result = prune_model(whole, meta.arch, scores, target, options)
    log(f"kept layers {result.kept_layers}; pruned architecture {result.arch.to_dict()}")
    layout = layout_from_args(args)
    initialize(layout, args.device)
    chunks = build_model(result.arch, initialize=False)
    load_full_state(chunks, result.state)
    with atomic_directory(Path(args.out), args.overwrite) as scratch:
        save_chunks(chunks, scratch)
        if torch.distributed.get_rank() == 0:
            tokenizer = Path(args.checkpoint) / TOKENIZER_DIR
            if tokenizer.is_dir():
                import shutil

                shutil.copytree(tokenizer, scratch / TOKENIZER_DIR)
            CheckpointMeta(
                arch=result.arch,
                layout=layout.to_dict(),
                tokenizer=meta.tokenizer,
                provenance=provenance(
                    f"megatron:{args.checkpoint}",
                    scores=str(args.scores),
                    target=asdict(target),
                    options=asdict(options),
                    source_arch=meta.arch.to_dict(),
                    kept_layers=result.kept_layers,
                    dropped_layers=result.dropped_layers,
                    clap_donors={str(k): v for k, v in result.clap_donors.items()},
                ),  # fmt: skip
            ).write(scratch)
    log(f"wrote {args.out}")
