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
import shutil
from pathlib import Path

from megatron_prune.distributed import add_layout_args, layout_from_args
from megatron_prune.errors import UserError

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
    add_layout_args(parser)


def world_size_needed(args: argparse.Namespace) -> int:
    return args.tp * args.pp


def _options(args: argparse.Namespace):
    from megatron_prune.distill.loss import DistillLossConfig
    from megatron_prune.distill.trainer import TrainOptions

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
        seed=args.seed, log_interval=args.log_interval, eval_interval=args.eval_interval,
        eval_tokens=args.eval_tokens, save_interval=args.save_interval,
        keep_checkpoints=args.keep_checkpoints, tensorboard=args.tensorboard,
        wandb_project=args.wandb_project,
    )  # fmt: skip
    return loss, options


def validate(args: argparse.Namespace) -> None:
    """Everything that can be checked before a process is spawned or a model is built."""
    from megatron_prune.checkpoint.atomic import OutputExistsError
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.data.training import parse_blend

    layout = layout_from_args(args)
    student = CheckpointMeta.read(args.student)
    student.arch.check_layout(layout.tp, layout.pp, layout.vpp)
    loss, _ = _options(args)  # building both configs validates their values
    if args.teacher is None:
        if loss.lm_weight != 1.0:
            raise UserError("no --teacher: pass --lm-weight 1 to train on the LM loss alone")
    else:
        teacher = CheckpointMeta.read(args.teacher)
        teacher.arch.check_layout(layout.tp, layout.pp, layout.vpp)
        _check_same_vocabulary(teacher, student, args.teacher, args.student)
    if args.train_tokens < 1 or args.seq_len < 2:
        raise UserError("--train-tokens must be >= 1 and --seq-len >= 2")
    dp = (args.nproc_per_node or layout.model_parallel_size) // layout.model_parallel_size
    if args.global_batch % (args.micro_batch * max(dp, 1)):
        raise UserError(
            f"--global-batch {args.global_batch} must be a multiple of --micro-batch "
            f"{args.micro_batch} x data-parallel size {dp}"
        )
    if layout.vpp and (args.global_batch // (args.micro_batch * max(dp, 1))) % layout.pp:
        raise UserError(
            "an interleaved pipeline needs micro-batches per step to be a multiple of --pp "
            f"({layout.pp}); raise --global-batch"
        )
    parse_blend(args.data)
    if args.eval_data and not Path(args.eval_data).is_file():
        raise UserError(f"--eval-data {args.eval_data} does not exist")
    out = Path(args.out).resolve()
    for name, path in (("--student", args.student), ("--teacher", args.teacher)):
        if path is not None and Path(path).resolve() in (out, *out.parents):
            raise UserError(f"--out {args.out} would hold or replace {name} {path}: choose "
                             "another run folder")  # fmt: skip
    if out.exists() and not (args.resume or args.overwrite):
        raise OutputExistsError(out)
    looks_like_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if args.overwrite and out.is_dir() and any(out.iterdir()) and not looks_like_run:
        raise UserError(
            f"--overwrite would delete {args.out}, which is not a distill run folder "
            "(no metrics.jsonl or checkpoints/): choose another --out"
        )


def _check_same_vocabulary(teacher, student, teacher_path: str, student_path: str) -> None:
    """Full-vocabulary KD compares logits id by id: the tokenizers must be the same."""
    t, s = teacher.arch, student.arch
    same_ids = t.vocab_size == s.vocab_size and t.padded_vocab_size == s.padded_vocab_size
    files = [Path(p) / "tokenizer" / "tokenizer.json" for p in (teacher_path, student_path)]
    if all(f.is_file() for f in files):
        same_ids = same_ids and files[0].read_bytes() == files[1].read_bytes()
    if not same_ids:
        raise UserError(
            f"teacher ({t.vocab_size} tokens) and student ({s.vocab_size} tokens) do not share "
            "a tokenizer; full-vocabulary distillation needs the same one"
        )


def run(args: argparse.Namespace) -> None:
    import torch

    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.data.training import parse_blend
    from megatron_prune.distill.trainer import options_dict, setup_run, train
    from megatron_prune.distributed import initialize, model_device
    from megatron_prune.log import is_rank0, log

    validate(args)
    loss, options = _options(args)
    layout = layout_from_args(args)
    accel = initialize(layout, args.device, seed=args.seed)
    out = Path(args.out)
    if args.overwrite and out.exists() and is_rank0():
        shutil.rmtree(out)
    torch.distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    eval_ids = None
    if args.eval_data:
        eval_ids = load_tokenizer(args.student).encode(Path(args.eval_data).read_text("utf-8"))
    run_config = {**options_dict(options, loss), "teacher": args.teacher,
                  "student": args.student, "data": args.data}  # fmt: skip
    log(f"distilling {options.steps} steps of {options.tokens_per_step} tokens at "
        f"TP={layout.tp} PP={layout.pp} VPP={layout.vpp} SP={layout.sequence_parallel} "
        f"DP={torch.distributed.get_world_size() // layout.model_parallel_size}")  # fmt: skip
    job = setup_run(
        Path(args.teacher) if args.teacher else None, Path(args.student),
        parse_blend(args.data), out, layout, model_device(accel), options,
    )  # fmt: skip
    state = train(job, out, loss, options, eval_ids, args.resume, run_config)
    if is_rank0():
        print(json.dumps({"steps": state.step, **state.history[-1],
                          "student": str(out / "student")}), flush=True)  # fmt: skip
