"""``megatron-prune plan CKPT --scores DIR --budget params=0.5 --strategy uniform|alpha --out
PLAN.yaml``: a pruning target from a budget (no weights, no torch.distributed: it runs in the
launcher process). Then ``megatron-prune prune CKPT --scores DIR --target PLAN.yaml``."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.plan.cost import DEFAULT_SEQ_LEN, METRICS
from megatron_prune.plan.strategies import DEFAULT_ALPHA_EPS, DEFAULT_DIMS, DIMS, STRATEGIES

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a megatron-prune checkpoint folder (only its metadata "
                        "is read)")  # fmt: skip
    parser.add_argument("--scores", default=None,
                        help="a folder written by `score` (alpha: scored with --metrics esd)")
    parser.add_argument("--budget", required=True,
                        help=f"METRIC=FRACTION of the dense blocks' cost to keep; metrics: "
                             f"{', '.join(METRICS)} (latency: analytic, = FLOPs)")  # fmt: skip
    parser.add_argument("--strategy", default="uniform",
                        help=f"{' | '.join(STRATEGIES)} (default: %(default)s)")  # fmt: skip
    parser.add_argument("--prune", default=",".join(DEFAULT_DIMS),
                        help=f"dimensions that may shrink, from {','.join(DIMS)} "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--alpha-eps", type=float, default=DEFAULT_ALPHA_EPS,
                        help="AlphaPruning's ratio spread: shares in [1-eps, 1+eps] "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                        help="sequence length of the FLOPs count (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the plan file (YAML, written atomically)")
    parser.add_argument("--overwrite", action="store_true")
    group = parser.add_argument_group("the layout the pruned model must run at")
    group.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)


def _kwargs(args: argparse.Namespace) -> dict:
    return dict(budget=args.budget, strategy=args.strategy, tp=args.tp, pp=args.pp,
                prune=args.prune, alpha_eps=args.alpha_eps, seq_len=args.seq_len,
                overwrite=args.overwrite)  # fmt: skip


def world_size_needed(args: argparse.Namespace) -> int:
    return 1  # arithmetic on the metadata: no ranks, whatever --tp/--pp say


def validate(args: argparse.Namespace) -> None:
    api.check_plan(args.checkpoint, args.scores, args.out, **_kwargs(args))


def run(args: argparse.Namespace) -> None:
    from megatron_prune.log import log

    result = api.plan(args.checkpoint, args.scores, args.out, **_kwargs(args))
    log(f"plan {args.out}: {result.record['achieved']}")
