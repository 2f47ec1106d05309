"""Time one built model: prefill (forward), decode with a KV cache, a training step, and each
transformer layer's forward.

Notation: b = rows per step on each data-parallel rank (``batch_size``), s = sequence length,
m = rows per micro-batch, N = decoded tokens per row, dp = data-parallel size.

* **prefill**: forward of [b, s] tokens through Megatron's pipeline schedule
  (:func:`~megatron_prune.evaluate.forward.forward_reduce`), logits reduced on the last stage.
* **decode**: megatron-core's KV cache (``StaticInferenceContext``, what its static inference
  engine uses): one forward of the [b, s] prompt fills the cache, then N one-token forwards are
  timed, each feeding the greedy token of the step before. Pipeline stages (PP > 1) and
  sequence parallelism (a one-token step cannot be split over TP ranks) are not measured.
* **train**: the student step of ``distill`` run on the LM loss: megatron-core's
  DistributedDataParallel, ``get_megatron_optimizer`` (Adam, gradient clipping at 1.0) and its
  pipeline schedules (:func:`~megatron_prune.distill.trainer.train_step`); in bf16/fp16 the
  model computes in that dtype inside ``Float16Module`` and the optimizer keeps fp32 main
  parameters (distill's mixed precision). It runs last: it wraps the model and adds gradient
  buffers and optimizer state.
* **layers**: a separate pass of prefill forwards with a device sync around every transformer
  layer: its forward milliseconds, grouped by layer shape (for a latency table). The syncs cost
  a little, so these do not add up to the prefill time exactly.

Times are medians over ``iters`` calls after ``warmup`` untimed ones, the slowest rank's; a
phase's tokens are those of every data-parallel replica (dp x b x s, dp x b x N).
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

import torch
from megatron.core import parallel_state

from megatron_prune.bench.options import BenchOptions
from megatron_prune.bench.timing import median, synchronize, time_calls
from megatron_prune.evaluate.forward import forward_reduce
from megatron_prune.models.arch import ModelArch

OPTIMIZER = (
    "megatron-core get_megatron_optimizer Adam (DDP, grad clip 1.0, fp32 main params), LM loss"
)
DECODE_METHOD = "kv_cache (megatron.core StaticInferenceContext), greedy"


def slowest(seconds: float, device: torch.device) -> float:
    """The largest of every rank's ``seconds``: the world is as fast as its slowest rank."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def random_tokens(arch: ModelArch, rows: int, seq_len: int, device: torch.device,
                  seed: int = 0) -> torch.Tensor:  # fmt: skip
    """[rows, seq_len] token ids, the same on every rank (TP and PP ranks must agree)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, arch.vocab_size, (rows, seq_len), generator=g).to(device)


def _device(chunks: list[torch.nn.Module]) -> torch.device:
    return next(chunks[0].parameters()).device


def _dtype(chunks: list[torch.nn.Module]) -> torch.dtype:
    return next(chunks[0].parameters()).dtype


def time_prefill(chunks: list[torch.nn.Module], arch: ModelArch,
                 options: BenchOptions) -> float:  # fmt: skip
    """Median seconds of one forward of [b, s] tokens (the slowest rank's)."""
    device = _device(chunks)
    tokens = random_tokens(arch, options.batch_size, options.seq_len, device)
    mbs = options.micro_batch()

    def reduce(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 0].float()  # [m]: small, and it depends on the whole forward

    def call() -> object:
        return forward_reduce(chunks, tokens, reduce, micro_batch_size=mbs)

    return slowest(median(time_calls(call, device, options.warmup, options.iters)), device)


def decode_unsupported(layout_pp: int, sequence_parallel: bool) -> str | None:
    """Why the KV-cache decode cannot be timed at this layout, or None."""
    if layout_pp > 1:
        return "not measured at PP > 1 (the KV-cache loop here runs one pipeline stage)"
    if sequence_parallel:
        return "not measured with sequence parallelism (one token cannot be split over TP)"
    return None


def decode(
    chunk: torch.nn.Module, arch: ModelArch, prompt: torch.Tensor, new_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Greedy decoding with megatron-core's KV cache: (the [b, N] tokens fed to the decode
    steps, their [b, N, V] logits, seconds of those steps). The prompt's forward fills the
    cache and is not timed."""
    from megatron.core.inference.contexts import StaticInferenceContext

    b, s = prompt.shape
    device = prompt.device
    context = StaticInferenceContext(b, s + new_tokens)
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, -1)
    fed, steps = [], []
    with torch.no_grad():
        logits = chunk(prompt, positions, None, inference_context=context,
                       runtime_gather_output=True)  # fmt: skip
        context.sequence_len_offset += s
        synchronize(device)
        start = time.perf_counter()
        for p in range(s, s + new_tokens):
            token = logits[:, -1:, : arch.vocab_size].argmax(-1)  # [b, 1]
            position = torch.full((b, 1), p, device=device)
            logits = chunk(token, position, None, inference_context=context,
                           runtime_gather_output=True)  # fmt: skip
            context.sequence_len_offset += 1
            fed.append(token)
            steps.append(logits[:, -1, : arch.vocab_size])
        synchronize(device)
        seconds = time.perf_counter() - start
    return torch.cat(fed, 1), torch.stack(steps, 1), seconds


def time_decode(chunks: list[torch.nn.Module], arch: ModelArch, options: BenchOptions) -> float:
    """Median seconds of ``decode_tokens`` KV-cache steps after an s-token prompt."""
    device = _device(chunks)
    prompt = random_tokens(arch, options.batch_size, options.seq_len, device, seed=1)
    runs = [decode(chunks[0], arch, prompt, options.decode_tokens)[2]
            for _ in range(options.warmup + options.iters)]  # fmt: skip
    return slowest(median(runs[options.warmup :]), device)


def time_train(chunks: list[torch.nn.Module], arch: ModelArch, options: BenchOptions) -> float:
    """Median seconds of one training step on b x s tokens per DP rank (megatron-core's DDP and
    optimizer; the model is wrapped for training and stays so)."""
    from megatron_prune.distill.loss import DistillLossConfig, distillation_loss
    from megatron_prune.distill.trainer import TrainOptions, prepare_training, train_step

    device = _device(chunks)
    dp = parallel_state.get_data_parallel_world_size()
    mbs = options.micro_batch()
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(_dtype(chunks), "fp32")
    train_options = TrainOptions(train_tokens=1, seq_len=options.seq_len, lr=1e-6, min_lr=1e-7,
                                 global_batch=options.batch_size * dp, micro_batch=mbs,
                                 precision=precision)  # fmt: skip
    ddp, models, optimizer, scheduler = prepare_training(chunks, None, train_options)
    rows = random_tokens(arch, options.batch_size, options.seq_len + 1, device, seed=2)
    positions = torch.arange(options.seq_len, device=device).unsqueeze(0).expand(mbs, -1)
    micro_batches = [
        {"tokens": r[:, :-1], "labels": r[:, 1:], "position_ids": positions,
         "loss_mask": torch.ones(mbs, options.seq_len, device=device)}
        for r in rows.split(mbs)
    ]  # fmt: skip
    loss = functools.partial(distillation_loss, DistillLossConfig(lm_weight=1.0), arch.vocab_size)

    def call() -> object:
        return train_step(ddp, models, optimizer, scheduler, micro_batches, loss,
                          options.seq_len)  # fmt: skip

    return slowest(median(time_calls(call, device, options.warmup, options.iters)), device)


def layer_forward_ms(chunks: list[torch.nn.Module], arch: ModelArch,
                     options: BenchOptions) -> dict[int, float]:  # fmt: skip
    """0-based layer -> median milliseconds of its forward on [m, s] tokens, every layer of the
    model (gathered from every pipeline stage; TP and DP ranks agree to within noise, the
    slowest is kept)."""
    device = _device(chunks)
    times: dict[int, list[float]] = defaultdict(list)
    started: dict[int, float] = {}
    handles = []

    def before(layer: int, *_args: object, **_kwargs: object) -> None:
        synchronize(device)
        started[layer] = time.perf_counter()

    def after(layer: int, *_args: object, **_kwargs: object) -> None:
        synchronize(device)
        times[layer].append(time.perf_counter() - started[layer])

    for chunk in chunks:
        for module in chunk.decoder.layers:
            i = module.layer_number - 1  # megatron's layer_number: global, 1-based
            handles.append(module.register_forward_pre_hook(functools.partial(before, i)))
            handles.append(module.register_forward_hook(functools.partial(after, i)))
    try:
        time_prefill(chunks, arch, BenchOptions(
            batch_size=options.batch_size, seq_len=options.seq_len,
            micro_batch_size=options.micro_batch_size, warmup=0, iters=options.iters,
        ))  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    # every call of a layer (micro-batches x iterations); the warm-up's first call is dropped
    mine = {i: 1000 * median(t[1:] or t) for i, t in times.items()}
    gathered: list[dict[int, float] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    out: dict[int, float] = {}
    for part in gathered:
        for i, ms in (part or {}).items():
            out[i] = max(ms, out.get(i, 0.0))
    return dict(sorted(out.items()))


def layer_shape_table(arch: ModelArch, per_layer: dict[int, float]) -> list[dict]:
    """Layers grouped by shape (FFN size, heads, query groups, sliding window or not): the
    median forward milliseconds of each group, and which layers are in it."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i in per_layer:
        w = arch.widths(i)
        key = (w.ffn_hidden_size, w.num_attention_heads, w.num_query_groups,
               arch.is_local_layer(i))  # fmt: skip
        groups[key].append(i)
    return [
        {"hidden_size": arch.hidden_size, "ffn_hidden_size": f, "num_attention_heads": n,
         "num_query_groups": g, "local": local, "layers": layers,
         "forward_ms": median([per_layer[i] for i in layers])}
        for (f, n, g, local), layers in groups.items()
    ]  # fmt: skip
