"""``megatron-prune prune CKPT --scores DIR --target TARGET.yaml --out OUT``: structured pruning
with re-initialisation (CLAP, SLNP, Post-RMSNorm absorption), written at any layout."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.commands.common import add_checkpoint_args, world_size_needed
from megatron_prune.distributed import layout_from_args

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]

_SCORE_FLAGS = (("channel", "channel/l1"), ("head", "head/l2"), ("neuron", "neuron/l2"),
                ("layer", "layer/block_influence"))  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_args(parser)
    parser.add_argument("--scores", required=True, help="a folder written by `score`")
    parser.add_argument("--target", required=True, help="target architecture (YAML)")
    parser.add_argument("--out", required=True, help="pruned checkpoint folder (atomic)")
    parser.add_argument("--clap", action="store_true", help="Cross-Layer Attention Pruning")
    parser.add_argument("--slnp", action="store_true", help="Stabilized LayerNorm Pruning")
    parser.add_argument("--absorb-post-norms", action="store_true",
                        help="fold sandwich post-norms into the output projections")  # fmt: skip
    parser.add_argument("--drop-post-norms", action="store_true",
                        help="remove sandwich post-norms outright (the baseline absorption "
                             "is compared with)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true")
    for unit, default in _SCORE_FLAGS:
        parser.add_argument(f"--{unit}-score", default=default,
                            help=f"which score ranks {unit}s (default: %(default)s)")  # fmt: skip


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(
        clap=args.clap, slnp=args.slnp, absorb_post_norms=args.absorb_post_norms,
        drop_post_norms=args.drop_post_norms,
        channel_score=args.channel_score, head_score=args.head_score,
        neuron_score=args.neuron_score, layer_score=args.layer_score,
    )  # fmt: skip


def validate(args: argparse.Namespace) -> None:
    from megatron_prune.surgery.prune import PruneOptions, plan_surgery

    meta, target, scores = api.check_prune(
        args.checkpoint, args.scores, args.target, args.out,
        options=PruneOptions(**_kwargs(args)), layout=layout_from_args(args),
        overwrite=args.overwrite,
    )  # fmt: skip
    plan_surgery(meta.arch, scores, target, PruneOptions(**_kwargs(args)))  # fits every layer


def run(args: argparse.Namespace) -> None:
    api.prune(args.checkpoint, args.scores, args.target, args.out, **_kwargs(args),
              layout=layout_from_args(args), device=args.device,
              overwrite=args.overwrite)  # fmt: skip
