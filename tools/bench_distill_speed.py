"""Distillation cost, ratios measured in one run (SmolLM2-135M shape, random weights):

  step   KD step time / (teacher forward + student LM training step), same batches, target <= 1.10
         python tools/bench_distill_speed.py step --device cuda [--seq-len 2048 --micro-batch 4]
  attention  forward and KD-step tokens/s, fused core attention (default) vs megatron-core's
         local one, same models and batches, interleaved
         python tools/bench_distill_speed.py attention --device cpu --seq-len 512 --micro-batch 1
  memory peak memory of the loss (forward + backward, given logits) on each of 2 TP ranks:
         vocab-parallel KL vs gathering both logits and a full-vocabulary KL, target <= 0.5x
         python -m torch.distributed.run --nproc-per-node 2 tools/bench_distill_speed.py memory
         (CUDA: both ranks share the one GPU over gloo; peak from torch.cuda.max_memory_allocated)

The student is SmolLM2 pruned to about half its block parameters (the recovery benchmark's
target). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

TARGET_50 = {"num_layers": 24, "hidden_size": 448, "ffn_hidden_size": 1152,
             "num_attention_heads": 6, "num_query_groups": 3}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_jobs(args: argparse.Namespace, attention_backend: str) -> tuple[dict, dict]:
    """(jobs, facts): the KD step, the student's LM step and the teacher's forward on the same
    batches, with models built for ``attention_backend``."""
    import functools

    from megatron_prune.data.models import smollm2_135m_arch
    from megatron_prune.distill.loss import DistillLossConfig, distillation_loss
    from megatron_prune.distill.trainer import TrainOptions, prepare_training, train_step
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import forward_reduce
    from megatron_prune.models.gpt import build_model
    from megatron_prune.plan.target import load_target

    accel = initialize(ParallelLayout(), args.device)
    device = accel.device(0)
    place = None if device.type == "cpu" else device
    teacher_arch = smollm2_135m_arch()
    kept = range(TARGET_50["num_layers"])  # which layers survive does not change the speed
    student_arch = load_target(TARGET_50, teacher_arch).arch(teacher_arch, kept)
    options = TrainOptions(train_tokens=10**9, seq_len=args.seq_len,
                           global_batch=args.micro_batch * args.micro_batches,
                           micro_batch=args.micro_batch)  # fmt: skip
    vocab = teacher_arch.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (options.global_batch, args.seq_len + 1), generator=g)
    micro_batches = [
        {"tokens": rows[:, :-1].to(device), "labels": rows[:, 1:].to(device),
         "loss_mask": torch.ones(rows.shape[0], args.seq_len, device=device),
         "position_ids": torch.arange(args.seq_len, device=device).expand(rows.shape[0], -1)}
        for rows in tokens.split(args.micro_batch)
    ]  # fmt: skip
    teacher_dtype = torch.bfloat16 if args.teacher_bf16 else torch.float32
    build = functools.partial(build_model, device=place, attention_backend=attention_backend)
    teacher = build(teacher_arch, params_dtype=teacher_dtype)
    kd = prepare_training(build(student_arch), teacher, options)
    lm = prepare_training(build(student_arch), None, options)
    kd_loss = functools.partial(distillation_loss, DistillLossConfig(), vocab)
    lm_loss = functools.partial(distillation_loss, DistillLossConfig(lm_weight=1.0), vocab)
    whole_tokens = torch.cat([mb["tokens"] for mb in micro_batches])
    jobs = {
        "kd_step": lambda: train_step(*kd, micro_batches, kd_loss, args.seq_len),
        "student_step": lambda: train_step(*lm, micro_batches, lm_loss, args.seq_len),
        "teacher_forward": lambda: forward_reduce(
            teacher, whole_tokens, lambda lg: lg[:, :1, :1].float(), args.micro_batch
        ),
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    facts = {"device": name, "tokens_per_step": options.global_batch * args.seq_len,
             "torch_device": device}  # fmt: skip
    return jobs, facts


def _best_times(jobs: dict, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Best of ``args.repeats`` after ``args.warmup``, jobs interleaved so that drifts in the
    machine's speed hit all of them."""

    def timed(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in jobs}
    for repeat in range(args.warmup + args.repeats):
        for name, job in jobs.items():
            seconds = timed(job)
            if repeat >= args.warmup:
                times[name].append(seconds)
    return {name: min(values) for name, values in times.items()}


def bench_step(args: argparse.Namespace) -> dict:
    jobs, facts = _step_jobs(args, args.attention_backend)
    best = _best_times(jobs, facts["torch_device"], args)
    return {
        "device": facts["device"],
        "tokens_per_step": facts["tokens_per_step"],
        "seconds": best,
        "ratio": best["kd_step"] / (best["teacher_forward"] + best["student_step"]),
        "settings": vars(args),
    }


def bench_attention(args: argparse.Namespace) -> dict:
    """Forward (the teacher's, SmolLM2-135M) and KD-step tokens/s with the default fused core
    attention vs megatron-core's local one, timed interleaved in one process."""
    jobs, facts = {}, {}
    for backend in ("auto", "local"):
        backend_jobs, facts = _step_jobs(args, backend)
        jobs[f"forward_{backend}"] = backend_jobs["teacher_forward"]
        jobs[f"kd_step_{backend}"] = backend_jobs["kd_step"]
    best = _best_times(jobs, facts["torch_device"], args)
    tokens = facts["tokens_per_step"]
    per_second = {name: tokens / seconds for name, seconds in best.items()}
    return {
        "device": facts["device"], "tokens_per_step": tokens, "tokens_per_second": per_second,
        "forward_speedup": per_second["forward_auto"] / per_second["forward_local"],
        "kd_step_speedup": per_second["kd_step_auto"] / per_second["kd_step_local"],
        "settings": vars(args),
    }  # fmt: skip


def bench_memory(args: argparse.Namespace) -> dict:
    """Two ranks, TP=2 over gloo (CPU tensors, or CUDA tensors on one shared GPU)."""
    from megatron.core import parallel_state

    from megatron_prune.distill.kl import vocab_parallel_kl

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    group = parallel_state.get_tensor_model_parallel_group()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if not cuda:
        raise SystemExit("memory: peak memory is read from the CUDA allocator; run on a GPU")
    vocab, tokens = 49152, args.micro_batch * args.seq_len
    shard = vocab // 2
    g = torch.Generator().manual_seed(rank)
    student = torch.randn(tokens, shard, generator=g).to(device)
    teacher = torch.randn(tokens, shard, generator=g).to(device)

    def gathered(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a loss that gathers does: whole [T, V] logits on every rank, then a full KL.
        (gloo has no CUDA all_gather: an all-reduce of zero-padded shards builds the same
        [T, V] tensors; its gradient is the rank's slice, as all_gather's would be.)"""

        class Gather(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                full = torch.zeros(tokens, vocab, device=device, dtype=x.dtype)
                full[:, rank * shard : (rank + 1) * shard] = x
                torch.distributed.all_reduce(full, group=group)
                return full

            @staticmethod
            def backward(ctx, grad):
                return grad[:, rank * shard : (rank + 1) * shard].contiguous()

        log_q = torch.log_softmax(Gather.apply(s).float(), -1)
        log_p = torch.log_softmax(Gather.apply(t).float(), -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def vocab_parallel(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_kl(s, t, group=group, vocab_start=rank * shard,
                                 chunk_tokens=args.chunk_tokens)  # fmt: skip

    peaks = {}
    for name, loss in (("vocab_parallel", vocab_parallel), ("gathered", gathered)):
        s = student.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss(s, teacher).sum().backward()
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del s
    return {
        "rank": rank,
        "tokens": tokens,
        "vocab": vocab,
        "peak_bytes": peaks,
        "ratio": peaks["vocab_parallel"] / peaks["gathered"],
        "settings": vars(args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["step", "memory", "attention"])
    parser.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "local"],
                        help="step: the core attention of every model")  # fmt: skip
    parser.add_argument("--device", default=None, help="cuda, npu or cpu (default: best)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--teacher-bf16", action="store_true")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run = {"step": bench_step, "memory": bench_memory, "attention": bench_attention}
    result = run[args.what](args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
