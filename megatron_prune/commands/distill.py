"""``megatron-prune distill --teacher CKPT --student CKPT --data PREFIX --train-tokens N
--out DIR``: online full-vocabulary logit distillation, teacher and student under one parallel
layout.

DIR receives ``student/`` (the distilled student, a checkpoint ``eval ppl`` and ``convert``
accept), ``checkpoints/step_N`` (resumable training state), ``metrics.jsonl`` and, when asked,
``tensorboard/`` and ``wandb/``. The data-parallel size is the world size / (TP x PP): launch
with ``--nproc-per-node`` (or torchrun) for more ranks.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from megatron_prune import api
from megatron_prune.compute import add_compute_args, compute_from_args
from megatron_prune.distributed import add_layout_args, layout_from_args

__all__ = ["add_arguments", "run", "validate", "world_size_needed"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("models and data")
    io.add_argument("--teacher", default=None,
                    help="the unpruned model; omit to train on the LM loss only")  # fmt: skip
    io.add_argument("--student", required=True, help="the model to train (e.g. a pruned one)")
    io.add_argument("--data", nargs="+", required=True, metavar="PREFIX",
                    help="indexed dataset(s) from `data build`: PREFIX, or W1 PREFIX1 W2 "
                         "PREFIX2 ... (a Megatron-LM blend)")  # fmt: skip
    io.add_argument("--train-tokens", type=int, required=True, help="tokens to train on")
    io.add_argument("--out", required=True, help="run folder")
    io.add_argument("--eval-data", default=None, help="held-out text for perplexity (UTF-8)")
    io.add_argument("--eval-interval", type=int, default=0,
                    help="steps between held-out perplexities (0: at the end only)")  # fmt: skip
    io.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens scored")
    io.add_argument("--resume", action="store_true",
                    help="continue from --out's latest checkpoint (if any)")  # fmt: skip
    io.add_argument("--overwrite", action="store_true", help="delete an existing --out first")
    batch = parser.add_argument_group("batches and optimisation")
    batch.add_argument("--seq-len", type=int, default=512)
    batch.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    batch.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    batch.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    batch.add_argument("--min-lr", type=float, default=1e-5, help="learning rate after cosine")
    batch.add_argument("--warmup-steps", type=int, default=0)
    batch.add_argument("--weight-decay", type=float, default=0.01)
    batch.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping")
    batch.add_argument("--distributed-optimizer", action="store_true",
                       help="shard optimizer state over data-parallel ranks")  # fmt: skip
    batch.add_argument("--overlap-grad-reduce", action="store_true")
    batch.add_argument("--teacher-bf16", action="store_true", help="hold the teacher in bf16")
    batch.add_argument("--initial-loss-scale", type=float, default=2.0**32,
                       help="--fp16: the dynamic loss scale to start from (halved on each "
                            "overflow, which skips that step)")  # fmt: skip
    batch.add_argument("--seed", type=int, default=1234, help="data order seed")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--temperature", type=float, default=1.0)
    loss.add_argument("--reverse-kl", action="store_true", help="KL(student || teacher)")
    loss.add_argument("--no-t2-scaling", action="store_true",
                      help="do not multiply the KL by T^2")  # fmt: skip
    loss.add_argument("--top-k", type=int, default=None,
                      help="teacher restricted to its k most likely tokens")  # fmt: skip
    loss.add_argument("--lm-weight", type=float, default=0.0,
                      help="share of LM cross-entropy (0: pure KD, 1: LM only)")  # fmt: skip
    out = parser.add_argument_group("logging and checkpoints")
    out.add_argument("--log-interval", type=int, default=1)
    out.add_argument("--save-interval", type=int, default=0,
                     help="steps between training checkpoints (0: at the end only)")  # fmt: skip
    out.add_argument("--keep-checkpoints", type=int, default=2)
    out.add_argument("--tensorboard", action="store_true", help="write DIR/tensorboard")
    out.add_argument("--wandb-project", default=None,
                     help="wandb run (offline unless WANDB_MODE=online)")  # fmt: skip
    add_compute_args(parser, training=True)
    add_layout_args(parser)


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp


def _options(args: argparse.Namespace):
    from megatron_prune.distill.loss_config import DistillLossConfig
    from megatron_prune.distill.options import TrainOptions

    loss = DistillLossConfig(
        temperature=args.temperature, reverse=args.reverse_kl,
        scale_by_t2=not args.no_t2_scaling, top_k=args.top_k, lm_weight=args.lm_weight,
    )  # fmt: skip
    options = TrainOptions(
        train_tokens=args.train_tokens, seq_len=args.seq_len, global_batch=args.global_batch,
        micro_batch=args.micro_batch, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, distributed_optimizer=args.distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, teacher_bf16=args.teacher_bf16,
        initial_loss_scale=args.initial_loss_scale,
        seed=args.seed, log_interval=args.log_interval, eval_interval=args.eval_interval,
        eval_tokens=args.eval_tokens, save_interval=args.save_interval,
        keep_checkpoints=args.keep_checkpoints, tensorboard=args.tensorboard,
        wandb_project=args.wandb_project, **asdict(compute_from_args(args)),
    )  # fmt: skip
    return loss, options


def _world_size(args: argparse.Namespace) -> int:
    layout = layout_from_args(args)
    nnodes = getattr(args, "nnodes", 1)  # the command line's launch flags (cli.py)
    return (args.nproc_per_node or max(1, layout.model_parallel_size // nnodes)) * nnodes


def validate(args: argparse.Namespace) -> None:
    """Everything that can be checked before a process is spawned or a model is built."""
    loss, options = _options(args)  # building both configs validates their values
    api.check_distill(args.student, args.data, args.out, teacher=args.teacher, loss=loss,
                      options=options, eval_data=args.eval_data, layout=layout_from_args(args),
                      world_size=_world_size(args), resume=args.resume,
                      overwrite=args.overwrite)  # fmt: skip


def run(args: argparse.Namespace) -> None:
    from megatron_prune.log import is_rank0

    loss, options = _options(args)
    result = api.distill(args.student, args.data, args.out, teacher=args.teacher, loss=loss,
                         options=options, eval_data=args.eval_data,
                         layout=layout_from_args(args), device=args.device,
                         resume=args.resume, overwrite=args.overwrite)  # fmt: skip
    if is_rank0():
        print(json.dumps(result), flush=True)
