"""``megatron-prune score CKPT --data FILE --samples N --seq-len L --out DIR``: importance scores
from calibration activations, at any TP x PP x DP (x SP) layout."""

from __future__ import annotations

import argparse

from megatron_prune import api
from megatron_prune.commands.common import add_checkpoint_args, world_size_needed
from megatron_prune.compute import add_compute_args, compute_from_args
from megatron_prune.distributed import layout_from_args

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_prune.importance.metrics import ALL_METRICS, DEFAULT_METRICS

    add_checkpoint_args(parser)
    add_compute_args(parser)
    parser.add_argument("--data", required=True, help="calibration text (UTF-8)")
    parser.add_argument("--samples", type=int, required=True, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--out", required=True, help="score folder (written atomically)")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=list(ALL_METRICS),
        metavar="METRIC", help=f"any of {', '.join(ALL_METRICS)} (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1234, help="calibration sampling seed")
    parser.add_argument("--micro-batches", type=int, default=2,
                        help="micro-batches per forward call per data-parallel rank (>= PP "
                             "keeps a pipeline full)")  # fmt: skip
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="samples per micro-batch; 4+ keeps a GPU busy")  # fmt: skip
    parser.add_argument("--save-every", type=int, default=8, help="rounds between partial saves")
    parser.add_argument("--resume", action="store_true", help="continue OUT.partial")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="score at most N samples in this run, save, and stop (preemptible "
                             "jobs; continue with --resume)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--esd-method", choices=["xmin_peak", "xmin_mid"], default="xmin_peak")
    parser.add_argument("--ppl-samples", type=int, default=4,
                        help="samples per perplexity with the layer_ppl metric")  # fmt: skip


def validate(args: argparse.Namespace) -> None:
    api.check_score(args.checkpoint, args.data, args.out, layout=layout_from_args(args),
                    resume=args.resume, overwrite=args.overwrite,
                    seq_len=args.seq_len)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    api.score(
        args.checkpoint, args.data, args.out, samples=args.samples, seq_len=args.seq_len,
        metrics=args.metrics, seed=args.seed, micro_batches=args.micro_batches,
        micro_batch_size=args.micro_batch_size, save_every=args.save_every,
        stop_after=args.stop_after, esd_method=args.esd_method, ppl_samples=args.ppl_samples,
        resume=args.resume, overwrite=args.overwrite, layout=layout_from_args(args),
        device=args.device, compute=compute_from_args(args),
    )  # fmt: skip
