"""``megatron-prune sparsify CKPT --sparsity 0.7 --method wanda|magnitude --allocation
uniform|alpha [--scores DIR] --out OUT``: unstructured masks on every block's linear layers,
AlphaPruning's own setting; the masked checkpoint keeps the dense shape (no speed-up)."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.commands.common import add_checkpoint_args, world_size_needed
from megatron_prune.distributed import layout_from_args
from megatron_prune.plan.strategies import DEFAULT_ALPHA_EPS
from megatron_prune.surgery.masks import ALLOCATIONS, METHODS

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_args(parser)
    parser.add_argument("--out", required=True, help="masked checkpoint folder (atomic)")
    parser.add_argument("--sparsity", type=float, required=True,
                        help="fraction of the blocks' matrix weights to zero, e.g. 0.7")
    parser.add_argument("--method", choices=METHODS, default="wanda",
                        help="magnitude: least |W| per matrix; wanda: least |W| * ||X|| per "
                             "output row (needs --scores with --metrics wanda) "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                        help="per-layer ratios: the same everywhere, or AlphaPruning's from "
                             "ESD alphas (needs --scores with --metrics esd) "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--alpha-eps", type=float, default=DEFAULT_ALPHA_EPS,
                        help="AlphaPruning's ratio spread (default: %(default)s)")
    parser.add_argument("--scores", default=None, help="a folder written by `score`")
    parser.add_argument("--overwrite", action="store_true")


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(scores=args.scores, sparsity=args.sparsity, method=args.method,
                allocation=args.allocation, alpha_eps=args.alpha_eps,
                layout=layout_from_args(args), overwrite=args.overwrite)  # fmt: skip


def validate(args: argparse.Namespace) -> None:
    api.check_sparsify(args.checkpoint, args.out, **_kwargs(args))


def run(args: argparse.Namespace) -> None:
    api.sparsify(args.checkpoint, args.out, **_kwargs(args), device=args.device)
