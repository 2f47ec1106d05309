"""The distillation training loop, on megatron.core's own machinery: pipeline schedules (1F1B and
interleaved), DistributedDataParallel, get_megatron_optimizer (optionally the distributed
optimizer), OptimizerParamScheduler (linear warmup, cosine decay) and gradient clipping.

One step = one global batch of ``global_batch`` sequences split over DP ranks and micro-batches;
the loss is a per-token mean over the whole global batch (see :mod:`megatron_prune.distill.loss`),
so a step computes the same update at every layout.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_prune.accelerator import cuda_type_names
from megatron_prune.checkpoint.megatron_io import LoadedModel, load_model
from megatron_prune.checkpoint.metadata import CheckpointMeta, provenance
from megatron_prune.compute import PRECISION_DTYPES, ComputeOptions
from megatron_prune.data.training import GlobalBatches, TokenizerView, build_train_dataset
from megatron_prune.distill.loss import DistillLossConfig, distillation_loss
from megatron_prune.distill.metrics import MetricsSink
from megatron_prune.distill.options import TrainOptions
from megatron_prune.distill.pair import pair_chunks
from megatron_prune.distill.state import (
    TrainerState,
    latest_checkpoint,
    load_training_checkpoint,
    save_student,
    save_training_checkpoint,
)
from megatron_prune.distributed import ParallelLayout
from megatron_prune.errors import UserError
from megatron_prune.evaluate.forward import broadcast_from_last_stage
from megatron_prune.log import log
from megatron_prune.progress import TokenCounter

METRICS = ("loss", "kl", "ce")


@dataclass
class Run:
    """Everything one rank holds while training."""

    student: LoadedModel
    teacher: LoadedModel | None
    ddp: list[DistributedDataParallel]
    schedule_models: list[torch.nn.Module]  # what the pipeline schedule runs (pairs or DDP)
    optimizer: object
    scheduler: OptimizerParamScheduler
    batches: GlobalBatches
    layout: ParallelLayout


def _wrap_ddp(chunks: list[torch.nn.Module], options: TrainOptions) -> list:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=options.overlap_grad_reduce,
        use_distributed_optimizer=options.distributed_optimizer,
    )
    return [
        DistributedDataParallel(
            config=chunk.config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0
        )
        for i, chunk in enumerate(chunks)
    ]


def _finalize(ddp: list, _models: list, num_tokens, **release_kwargs):
    """The schedule passes its own models (the pairs); gradients live in the student's DDP.
    Its other keywords are those of its own release's finalize_model_grads (they differ
    between releases, see compat.py), so they are handed on as they are."""
    finalize_model_grads(ddp, num_tokens, **release_kwargs)


def _install_schedule_hooks(config, ddp: list, options: TrainOptions) -> None:
    """What Megatron-LM's training loop sets on the config the schedules read."""
    no_sync = [c.no_sync for c in ddp]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if options.overlap_grad_reduce:
        sync = [c.start_grad_sync for c in ddp]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    config.finalize_model_grads_func = functools.partial(_finalize, ddp)


def _mixed_precision(chunks: list[torch.nn.Module], precision: str) -> list[torch.nn.Module]:
    """Megatron-LM's way: the model computes in bf16/fp16 inside ``Float16Module`` (which casts
    it in place and returns fp32 logits), and the optimizer keeps fp32 main parameters. The
    config says so, for the DDP wrapper, the optimizer and the pipeline's transport dtype."""
    from megatron.core.transformer.module import Float16Module

    if precision == "fp32":
        return chunks
    dtype = PRECISION_DTYPES[precision]
    config = chunks[0].config
    config.bf16, config.fp16 = precision == "bf16", precision == "fp16"
    config.params_dtype = config.pipeline_dtype = dtype
    return [Float16Module(config, chunk) for chunk in chunks]


def _optimizer(ddp: list, options: TrainOptions):
    # bf16 / fp16: fp32 main parameters in the optimizer; fp16 with a dynamic loss scale
    precision = options.precision
    config = OptimizerConfig(
        optimizer="adam",
        lr=options.lr,
        min_lr=options.min_lr,
        weight_decay=options.weight_decay,
        adam_beta1=options.adam_beta1,
        adam_beta2=options.adam_beta2,
        clip_grad=options.clip_grad,
        use_distributed_optimizer=options.distributed_optimizer,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        initial_loss_scale=options.initial_loss_scale,
        params_dtype=PRECISION_DTYPES[precision],
    )
    with cuda_type_names():
        optimizer = get_megatron_optimizer(config, ddp)
    steps = options.steps
    warmup = min(options.warmup_steps, steps - 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else options.lr, max_lr=options.lr,
        min_lr=options.min_lr, lr_warmup_steps=warmup, lr_decay_steps=steps,
        lr_decay_style="cosine", start_wd=options.weight_decay, end_wd=options.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
    )  # fmt: skip
    return optimizer, scheduler


def resolve_precision(options: TrainOptions, device: torch.device | None) -> TrainOptions:
    """``options`` with precision ``auto`` made concrete for a student on ``device``: bf16 on
    an accelerator, fp32 on the CPU (a no-op once resolved)."""
    precision = ComputeOptions(precision=options.precision).resolved_precision(device)
    return replace(options, precision=precision)


def prepare_training(
    student_chunks: list[torch.nn.Module],
    teacher_chunks: list[torch.nn.Module] | None,
    options: TrainOptions,
) -> tuple[list, list[torch.nn.Module], object, OptimizerParamScheduler]:
    """Wrap built models for training: (student DDP chunks, what the schedule runs, optimizer,
    LR scheduler). Without a teacher the schedule runs the student alone (LM loss)."""
    options = resolve_precision(options, next(student_chunks[0].parameters()).device)
    for chunk in student_chunks:
        chunk.train()
    student_chunks[0].config.calculate_per_token_loss = True  # one config object per model
    ddp = _wrap_ddp(_mixed_precision(student_chunks, options.precision), options)
    if teacher_chunks is None:
        schedule_models: list[torch.nn.Module] = list(ddp)
        schedule_config = student_chunks[0].config
    else:
        schedule_models = list(pair_chunks(ddp, teacher_chunks))
        schedule_config = schedule_models[0].config
    _install_schedule_hooks(schedule_config, ddp, options)
    optimizer, scheduler = _optimizer(ddp, options)
    # as Megatron-LM's setup: the schedules multiply the loss by fp16's dynamic loss scale
    # (1 under bf16 and fp32) before backward; the optimizer divides it out of the gradients
    schedule_config.grad_scale_func = optimizer.scale_loss
    return ddp, schedule_models, optimizer, scheduler


def setup_run(
    teacher_ckpt: Path | None,
    student_ckpt: Path,
    data_blend: tuple[list[str], list[float] | None],
    out: Path,
    layout: ParallelLayout,
    device: torch.device | None,
    options: TrainOptions,
) -> Run:
    """Collective: load both models at ``layout``, wrap the student, build optimizer and data.
    ``options.precision`` must be resolved (not ``auto``). Under mixed precision the teacher
    computes in the student's dtype (its activations travel with the student's between
    pipeline stages)."""
    student = load_model(
        student_ckpt, sequence_parallel=layout.sequence_parallel, device=device,
        attention_backend=options.attention_backend,
        recompute_granularity=options.recompute_granularity,
    )  # fmt: skip
    teacher = None
    if teacher_ckpt is not None:
        teacher_dtype = PRECISION_DTYPES[options.precision]
        if options.precision == "fp32" and options.teacher_bf16:
            teacher_dtype = torch.bfloat16
        teacher = load_model(
            teacher_ckpt, sequence_parallel=layout.sequence_parallel, device=device,
            params_dtype=teacher_dtype, attention_backend=options.attention_backend,
        )  # fmt: skip
    ddp, schedule_models, optimizer, scheduler = prepare_training(
        student.chunks, None if teacher is None else teacher.chunks, options
    )
    arch = student.arch
    dataset = build_train_dataset(
        data_blend,
        samples=options.steps * options.global_batch,
        seq_len=options.seq_len,
        tokenizer=TokenizerView(vocab_size=arch.vocab_size, eod=_eod(student)),
        seed=options.seed,
        cache_dir=out / "data_cache",
    )
    batches = GlobalBatches(
        dataset, global_batch=options.global_batch, micro_batch=options.micro_batch,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )  # fmt: skip
    return Run(student, teacher, ddp, schedule_models, optimizer, scheduler, batches, layout)


def _eod(model: LoadedModel) -> int:
    eos = model.meta.tokenizer.get("eos_id")
    if eos is None:
        raise UserError(f"{model.path}: its tokenizer has no EOS id to end documents with")
    return int(eos)


def _reduce_metrics(outputs: list[dict], device: torch.device) -> dict[str, float]:
    """Per-token means over the global batch, on every rank (outputs live on the last stage)."""
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    sums = None
    if last:
        sums = torch.zeros(len(METRICS), 2, dtype=torch.float64, device=device)
        for record in outputs:
            for i, name in enumerate(METRICS):
                if name in record:
                    sums[i] += record[name].to(sums)
        torch.distributed.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    sums = broadcast_from_last_stage(sums, device)
    return {
        name: float(sums[i, 0] / sums[i, 1]) for i, name in enumerate(METRICS) if sums[i, 1] > 0
    }


def train_step(
    ddp: list,
    schedule_models: list[torch.nn.Module],
    optimizer,
    scheduler: OptimizerParamScheduler,
    micro_batches: list[dict[str, torch.Tensor]],
    loss: Callable,
    seq_len: int,
) -> tuple[dict[str, float], float]:
    """One optimizer step over this DP rank's ``micro_batches``; ``loss`` is
    ``distillation_loss`` with its config and vocabulary bound. Returns (metrics, grad norm)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)
        return output, functools.partial(loss, batch["labels"], batch["loss_mask"])

    for chunk in ddp:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    n_chunks = len(schedule_models)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(micro_batches) for _ in range(n_chunks)]
        if n_chunks > 1
        else iter(micro_batches),
        model=schedule_models if n_chunks > 1 else schedule_models[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_len,
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=False,
    )
    with cuda_type_names():
        _, grad_norm, _ = optimizer.step()  # under fp16, a step skipped for overflow: norm None
    scheduler.step(increment=1)
    device = micro_batches[0]["tokens"].device
    return _reduce_metrics(outputs, device), float("nan") if grad_norm is None else float(grad_norm)


def _evaluate(run: Run, eval_ids: list[int], options: TrainOptions) -> float:
    from megatron_prune.evaluate.perplexity import perplexity

    arch = run.student.arch
    bos = run.student.meta.tokenizer.get("bos_id") if arch.needs_bos else None
    result = perplexity(
        run.student.chunks, eval_ids, options.seq_len, arch.vocab_size, bos,
        max_tokens=options.eval_tokens, progress=False,
    )  # fmt: skip
    for chunk in run.student.chunks:
        chunk.train()
    return result.ppl


def train(
    run: Run,
    out: Path,
    loss_config: DistillLossConfig,
    options: TrainOptions,
    eval_ids: list[int] | None,
    resume: bool,
    run_config: dict,
) -> TrainerState:
    """Collective: train from step 0 or the latest checkpoint in ``out``; return the final state."""
    state = TrainerState()
    latest = latest_checkpoint(out) if resume else None
    if latest is not None:
        state = load_training_checkpoint(latest, run.student.chunks, run.optimizer)
        run.scheduler.load_state_dict(state.scheduler)
        log(f"resumed from {latest} at step {state.step}")
    sink = MetricsSink(out, tensorboard=options.tensorboard,
                       wandb_project=options.wandb_project, run_config=run_config,
                       history=state.history)  # fmt: skip
    meta = CheckpointMeta(
        arch=run.student.arch,
        layout=run.layout.to_dict(),
        tokenizer=run.student.meta.tokenizer,
        provenance=provenance(str(run.student.path), distillation=run_config),
        dtype=options.precision,
    )
    device = next(run.student.chunks[0].parameters()).device
    loss = functools.partial(distillation_loss, loss_config, run.student.arch.vocab_size)
    bar = TokenCounter(options.steps * options.tokens_per_step, desc="distill")
    bar.update(state.step * options.tokens_per_step)
    try:
        while state.step < options.steps:
            started = time.perf_counter()
            micro_batches = run.batches.step(state.step, device)
            metrics, grad_norm = train_step(
                run.ddp, run.schedule_models, run.optimizer, run.scheduler, micro_batches, loss,
                options.seq_len,
            )  # fmt: skip
            state.step += 1
            record = {"step": state.step, **metrics, "grad_norm": grad_norm,
                      "lr": run.scheduler.get_lr(run.optimizer.param_groups[0]),
                      "step_seconds": time.perf_counter() - started}  # fmt: skip
            last = state.step == options.steps
            if eval_ids and (last or _every(options.eval_interval, state.step)):
                record["eval_ppl"] = _evaluate(run, eval_ids, options)
            if last or state.step % options.log_interval == 0 or "eval_ppl" in record:
                sink.log(record)
                if bar.bar is not None:
                    bar.bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
            bar.update(options.tokens_per_step)
            if last or _every(options.save_interval, state.step):
                state.scheduler = run.scheduler.state_dict()
                state.history = sink.history
                save_training_checkpoint(out, run.student.chunks, run.optimizer, state, meta,
                                         run.student.path, options.keep_checkpoints)  # fmt: skip
    finally:
        bar.close()
        sink.close()
    save_student(out / "student", run.student.chunks, meta, run.student.path)
    log(f"wrote {out / 'student'}")
    return state


def _every(interval: int, step: int) -> bool:
    return interval > 0 and step % interval == 0


def options_dict(options: TrainOptions, loss: DistillLossConfig) -> dict:
    return {**asdict(options), **{f"loss_{k}": v for k, v in loss.to_dict().items()},
            "world_size": int(os.environ.get("WORLD_SIZE", "1"))}  # fmt: skip
