"""Pieces several commands share: the checkpoint argument and its checks."""

from __future__ import annotations

import argparse

from megatron_prune.distributed import add_layout_args, layout_from_args


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a megatron-prune checkpoint folder")
    add_layout_args(parser)


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp


def validate_checkpoint(args: argparse.Namespace) -> None:
    """The checkpoint exists, is ours, and runs at the requested layout."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    layout = layout_from_args(args)
    CheckpointMeta.read(args.checkpoint).arch.check_layout(layout.tp, layout.pp, layout.vpp)
