"""Benchmark a list of models in one process group: build or load each in turn, time it, free it.

Every model of a run is timed with the same options at the same layout; the first is the
reference the others' ratios are against (see :mod:`megatron_prune.bench.report`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state

from megatron_prune.bench import flops, measure
from megatron_prune.bench.options import PHASES, BenchOptions
from megatron_prune.bench.peaks import device_name, peak_tflops
from megatron_prune.bench.report import SCHEMA, phase_record
from megatron_prune.distributed import ParallelLayout
from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch
from megatron_prune.plan.cost import block_params, model_params


@dataclass(frozen=True)
class ModelSpec:
    """One model to time: a checkpoint folder (``source="checkpoint"``) or random weights of
    ``arch`` (``source="shape"``); ``name`` is what the user typed."""

    name: str
    source: str
    arch: ModelArch


def model_specs(checkpoints: list[str], shapes: list[str]) -> list[ModelSpec]:
    """The models to time, checkpoints first, then shapes, each as the user named it."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.models.shapes import load_shape

    specs = [ModelSpec(str(c), "checkpoint", CheckpointMeta.read(c).arch) for c in checkpoints]
    specs += [ModelSpec(str(s), "shape", load_shape(s)) for s in shapes]
    if not specs:
        raise UserError("nothing to benchmark: name checkpoint folders and/or --shape NAME|FILE")
    return specs


def check_options(specs: list[ModelSpec], options: BenchOptions,
                  layout: ParallelLayout) -> None:  # fmt: skip
    """Refuse options no model of the run can be timed with, before any model is built."""
    for name in ("batch_size", "seq_len", "iters", "decode_tokens"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if options.warmup < 0:
        raise UserError("--warmup must be >= 0")
    unknown = sorted(set(options.phases) - set(PHASES))
    if unknown or not options.phases:
        raise UserError(f"--phases {','.join(options.phases)}: choose from "
                        f"{','.join(PHASES)}")  # fmt: skip
    mbs = options.micro_batch_size
    if mbs is not None and (mbs < 1 or options.batch_size % mbs):
        raise UserError(f"--micro-batch-size {mbs} must divide --batch-size "
                        f"{options.batch_size}")  # fmt: skip
    micro_batches = options.batch_size // (mbs or (options.batch_size if layout.pp == 1 else 1))
    if layout.vpp and "train" in options.phases and micro_batches % layout.pp:
        raise UserError(f"an interleaved pipeline trains on a multiple of --pp ({layout.pp}) "
                        f"micro-batches; got {micro_batches}: raise --batch-size")  # fmt: skip
    if layout.sequence_parallel and options.seq_len % layout.tp:
        raise UserError(f"--sequence-parallel splits each sequence over TP={layout.tp} ranks: "
                        f"--seq-len {options.seq_len} must be a multiple of "
                        f"{layout.tp}")  # fmt: skip
    for spec in specs:
        try:
            spec.arch.check_layout(layout.tp, layout.pp, layout.vpp)
        except UserError as err:
            raise type(err)(f"{spec.name}: {err}") from None


def build(spec: ModelSpec, layout: ParallelLayout, dtype: torch.dtype,
          device: torch.device | None, backend: str) -> list[torch.nn.Module]:  # fmt: skip
    """This rank's chunks of the model: loaded from the checkpoint, or randomly initialised
    (on ``device`` directly when it is an accelerator: fast, and no host copy of the weights)."""
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.models.gpt import build_model

    if spec.source == "checkpoint":
        return load_model(spec.name, sequence_parallel=layout.sequence_parallel,
                          params_dtype=dtype, device=device,
                          attention_backend=backend).chunks  # fmt: skip
    return build_model(spec.arch, sequence_parallel=layout.sequence_parallel,
                       params_dtype=dtype, device=device, initialize=True,
                       attention_backend=backend)  # fmt: skip


def bench_model(spec: ModelSpec, chunks: list[torch.nn.Module], layout: ParallelLayout,
                options: BenchOptions, dtype: torch.dtype, backend: str,
                peak_override: float | None) -> dict[str, Any]:  # fmt: skip
    """Time ``chunks`` (``spec``'s model) in every phase of ``options``; the record."""
    from megatron_prune.models.attention import core_attention_module

    arch = spec.arch
    device = next(chunks[0].parameters()).device
    world = torch.distributed.get_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    name = device_name(device)
    peak = peak_override if peak_override is not None else peak_tflops(name, dtype)
    b, s = options.batch_size, options.seq_len
    record: dict[str, Any] = {
        "schema": SCHEMA, "model": spec.name, "source": spec.source, "arch": arch.to_dict(),
        "params": model_params(arch), "block_params": block_params(arch),
        "device": name, "device_kind": device.type, "dtype": str(dtype).removeprefix("torch."),
        "attention_backend": backend,
        "attention_module": core_attention_module(backend).__name__, "layout": layout.to_dict(),
        "world_size": world, "data_parallel": dp, "batch_size": b, "seq_len": s,
        "micro_batch_size": options.micro_batch(), "warmup": options.warmup,
        "iters": options.iters, "peak_tflops": peak,
    }  # fmt: skip
    phases = options.phases
    if "prefill" in phases:
        seconds = measure.time_prefill(chunks, arch, options)
        record["prefill"] = phase_record(
            seconds, dp * b * s, flops.prefill_flops_per_token(arch, s), world, peak
        )
    if options.layer_timings:
        per_layer = measure.layer_forward_ms(chunks, arch, options)
        record["layers"] = measure.layer_shape_table(arch, per_layer)
        record["layer_forward_ms"] = {str(i): ms for i, ms in per_layer.items()}
    if "decode" in phases:
        why = measure.decode_unsupported(layout.pp, layout.sequence_parallel)
        if why:
            record["decode"] = {"skipped": why}
        else:
            n = options.decode_tokens
            seconds = measure.time_decode(chunks, arch, options)
            record["decode"] = phase_record(
                seconds, dp * b * n, flops.decode_flops_per_token(arch, s, n), world, peak,
                prompt_len=s, new_tokens=n, method=measure.DECODE_METHOD,
            )  # fmt: skip
    if "train" in phases:
        seconds = measure.time_train(chunks, arch, options)
        record["train"] = phase_record(seconds, dp * b * s,
                                       flops.train_flops_per_token(arch, s), world, peak,
                                       optimizer=measure.OPTIMIZER)  # fmt: skip
    return record


def free(chunks: list[torch.nn.Module]) -> None:
    """Drop a timed model before the next is built (its weights, gradients, optimizer)."""
    chunks.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
