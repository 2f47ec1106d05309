"""``megatron-prune score CKPT --data FILE --samples N --seq-len L --out DIR``: importance scores
from calibration activations, at any TP x PP x DP (x SP) layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_prune.commands.common import (
    add_checkpoint_args,
    open_checkpoint,
    validate_checkpoint,
    world_size_needed,
)
from megatron_prune.errors import UserError

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_prune.importance.scoring import ALL_METRICS, DEFAULT_METRICS

    add_checkpoint_args(parser)
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
    from megatron_prune.checkpoint.atomic import check_output
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    validate_checkpoint(args)
    if CheckpointMeta.read(args.checkpoint).arch.heterogeneous:
        raise UserError(
            f"{args.checkpoint} has per-layer widths (a heterogeneous pruned model): scoring it "
            "is not supported (scores are [layers, units] tables); prune the uniform source "
            "model with its scores instead"
        )
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data} does not exist")
    if Path(args.data).stat().st_size == 0:
        raise UserError(f"--data {args.data} is empty")
    check_output(Path(args.out), args.overwrite)
    partial = Path(args.out).with_name(Path(args.out).name + ".partial") / "partial.json"
    if args.resume and not partial.is_file():
        raise UserError(f"--resume: no partial run to continue ({partial} missing)")


def run(args: argparse.Namespace) -> None:
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import layout_from_args
    from megatron_prune.importance.scoring import ScoreJob, run_score_job

    validate(args)
    job = ScoreJob(
        checkpoint=str(Path(args.checkpoint).resolve()), data=args.data, samples=args.samples,
        seq_len=args.seq_len, out=args.out, metrics=sorted(set(args.metrics)), seed=args.seed,
        micro_batches=args.micro_batches, micro_batch_size=args.micro_batch_size,
        save_every=args.save_every, stop_after=args.stop_after,
        esd_method=args.esd_method, ppl_samples=args.ppl_samples,
    )  # fmt: skip
    tokenizer = load_tokenizer(args.checkpoint)
    model = open_checkpoint(args)
    run_score_job(job, model, tokenizer, layout_from_args(args), args.resume, args.overwrite)
