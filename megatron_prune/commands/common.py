"""Pieces several commands share: opening a checkpoint at the requested layout."""

from __future__ import annotations

import argparse

import torch

from megatron_prune.checkpoint.megatron_io import LoadedModel
from megatron_prune.distributed import (
    add_layout_args,
    initialize,
    layout_from_args,
    model_device,
)


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


def open_checkpoint(args: argparse.Namespace) -> LoadedModel:
    """Validate the layout against the checkpoint's architecture, then build and load."""
    from megatron_prune.checkpoint.megatron_io import load_model

    validate_checkpoint(args)
    layout = layout_from_args(args)
    accel = initialize(layout, args.device)
    return load_model(
        args.checkpoint,
        sequence_parallel=layout.sequence_parallel,
        device=model_device(accel),
        params_dtype=torch.float32,
    )
