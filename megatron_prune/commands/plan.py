"""``megatron-prune plan CKPT --scores DIR --budget params=0.5 --strategy uniform|alpha|tyr
--out PLAN.yaml``: a pruning target from a budget, valid at ``--tp`` x ``--pp``. uniform and
alpha read no weights and run in the launcher process; tyr searches with the dense model at
that layout (tp x pp ranks, times DP with ``--nproc-per-node``). Then
``megatron-prune prune CKPT --scores DIR --target PLAN.yaml``."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.distributed import add_layout_args, layout_from_args
from megatron_prune.plan.cost import DEFAULT_SEQ_LEN, METRICS
from megatron_prune.plan.strategies import DEFAULT_ALPHA_EPS, DEFAULT_DIMS, DIMS, STRATEGIES
from megatron_prune.plan.tyr.job import TyrSettings, parse_stages
from megatron_prune.plan.tyr.supernet import LOCAL_PRUNERS

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a megatron-prune checkpoint folder (only its metadata "
                        "is read)")  # fmt: skip
    parser.add_argument("--scores", default=None,
                        help="a folder written by `score` (alpha: scored with --metrics esd)")
    parser.add_argument("--budget", required=True,
                        help=f"METRIC=FRACTION of the dense blocks' cost to keep; metrics: "
                             f"{', '.join(METRICS)} (latency: analytic, = FLOPs, unless "
                             "--latency-table)")  # fmt: skip
    parser.add_argument("--latency-table", default=None, metavar="FILE.jsonl",
                        help="`bench --out` timings of this model (and pruned or --shape "
                             "variants) that calibrate a latency budget")  # fmt: skip
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
    tyr = parser.add_argument_group("tyr (Tyr-the-Pruner's supernet search; its cost knobs)")
    d = TyrSettings()
    tyr.add_argument("--data", default=None, help="calibration text (tyr)")
    tyr.add_argument("--tyr-samples", type=int, default=d.samples,
                     help="calibration windows (default: %(default)s)")
    tyr.add_argument("--tyr-seq-len", type=int, default=d.seq_len,
                     help="tokens per window (default: %(default)s)")
    tyr.add_argument("--tyr-seed", type=int, default=d.seed)
    tyr.add_argument("--tyr-iterations", type=int, default=d.iterations,
                     help="coarse-to-fine iterations, the move halving each (default: %(default)s)")
    tyr.add_argument("--tyr-generations", type=int, default=d.generations,
                     help="generations per iteration (default: %(default)s)")
    tyr.add_argument("--tyr-offspring", type=int, default=d.offspring,
                     help="offspring per generation, lambda (default: %(default)s)")
    tyr.add_argument("--tyr-stages", default=",".join(f"{a}:{b}" for a, b in d.stages),
                     help="selection stages WINDOWS:SURVIVORS,... with growing windows "
                          "(default: %(default)s)")  # fmt: skip
    tyr.add_argument("--tyr-step", type=float, default=d.step,
                     help="first move, fraction of the source width (default: %(default)s)")
    tyr.add_argument("--tyr-max-sparsity", type=float, default=d.max_sparsity)
    tyr.add_argument("--no-error-accumulation", dest="error_accumulation", action="store_false",
                     help="statistics from the dense model (default: expectation error "
                          "accumulation, layer by layer)")  # fmt: skip
    tyr.add_argument("--no-refit", dest="refit", action="store_false",
                     help="variants keep their weights (no least-squares refit)")
    tyr.add_argument("--tyr-local-pruner", choices=LOCAL_PRUNERS, default=d.local_pruner,
                     help="obs: greedy OBS choice of heads/neurons; scores: the units prune keeps "
                          "by --scores, so the search scores prune's own layers (default: "
                          "%(default)s)")  # fmt: skip
    tyr.add_argument("--resume", action="store_true",
                     help="continue the search kept in OUT.tyr/ (same settings)")
    # the layout the pruned model must run at, and where tyr's search runs
    add_layout_args(parser)


def _kwargs(args: argparse.Namespace) -> dict:
    tyr = None
    if args.strategy == "tyr":
        tyr = TyrSettings(samples=args.tyr_samples, seq_len=args.tyr_seq_len, seed=args.tyr_seed,
                          iterations=args.tyr_iterations, generations=args.tyr_generations,
                          offspring=args.tyr_offspring, stages=parse_stages(args.tyr_stages),
                          step=args.tyr_step, max_sparsity=args.tyr_max_sparsity,
                          error_accumulation=args.error_accumulation, refit=args.refit,
                          local_pruner=args.tyr_local_pruner)
    return dict(budget=args.budget, strategy=args.strategy, tp=args.tp, pp=args.pp,
                prune=args.prune, alpha_eps=args.alpha_eps, seq_len=args.seq_len,
                overwrite=args.overwrite, data=args.data, tyr=tyr,
                resume=args.resume, latency_table=args.latency_table,
                layout=layout_from_args(args) if tyr else None)  # fmt: skip


def world_size_needed(args: argparse.Namespace) -> int:
    """tyr searches at the layout; uniform and alpha are arithmetic on the metadata."""
    return args.tp * args.pp if args.strategy == "tyr" else 1


def validate(args: argparse.Namespace) -> None:
    api.check_plan(args.checkpoint, args.scores, args.out, **_kwargs(args))


def run(args: argparse.Namespace) -> None:
    from megatron_prune.log import log

    device = args.device if args.strategy == "tyr" else None
    result = api.plan(args.checkpoint, args.scores, args.out, **_kwargs(args), device=device)
    log(f"plan {args.out}: {result.record['achieved']}")
