"""Forward passes through Megatron's pipeline schedule, at any TP x PP (x VPP) layout.

Logits stay sharded over the vocabulary (TP) unless a caller gathers them; the caller's
``reduce`` runs on the last pipeline stage and its (small) result is broadcast to every stage.

Notation: b = batch, s = sequence, V = vocabulary, Vp = padded vocabulary, t = TP size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func


def vocab_shard_range(padded_vocab: int) -> tuple[int, int]:
    """[start, end) of the vocabulary held by this TP rank."""
    t = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    per = padded_vocab // t
    return r * per, (r + 1) * per


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padding entries (ids >= V) to -inf so they get no probability.

    logits: [b, s, Vp/t], this rank's shard. Example: V=5, Vp=8, t=2: rank 1 holds ids 4..7 and
    masks its local columns 1..3.
    """
    start, end = vocab_shard_range(
        logits.shape[-1] * parallel_state.get_tensor_model_parallel_world_size()
    )
    if end <= vocab_size:
        return logits
    local_first_pad = max(vocab_size - start, 0)
    logits = logits.clone()
    logits[..., local_first_pad:] = float("-inf")
    return logits


def gather_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[b, s, Vp/t] shards -> whole [b, s, V] logits on every TP rank."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]


def broadcast_from_last_stage(result: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Send the last stage's result to every stage of this rank's pipeline (on ``device``, as
    NCCL needs; the result comes back on the CPU)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        assert result is not None
        return result.cpu()
    group = parallel_state.get_pipeline_model_parallel_group()
    src = parallel_state.get_pipeline_model_parallel_last_rank()
    header = torch.zeros(9, dtype=torch.long, device=device)  # ndim, dtype code, up to 7 dims
    dtypes = [torch.float32, torch.long, torch.float64, torch.bfloat16, torch.float16]
    if result is not None:
        header[0] = result.dim()
        header[1] = dtypes.index(result.dtype)
        header[2 : 2 + result.dim()] = torch.tensor(result.shape)
    torch.distributed.broadcast(header, src=src, group=group)
    header = header.cpu()
    shape = tuple(header[2 : 2 + int(header[0])].tolist())
    if result is None:
        result = torch.empty(shape, dtype=dtypes[int(header[1])], device=device)
    result = result.to(device).contiguous()
    torch.distributed.broadcast(result, src=src, group=group)
    return result.cpu()


def forward_reduce(
    chunks: list[torch.nn.Module],
    tokens: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    micro_batch_size: int = 1,
) -> torch.Tensor:
    """Run ``tokens`` [b, s] through the model in micro-batches of ``micro_batch_size`` rows;
    return the micro-batches' ``reduce(logits_shard)`` results concatenated on dim 0, on the CPU
    of every rank.

    ``reduce`` receives this TP rank's [m, s, Vp/t] logits on the last stage, may use TP
    collectives (every TP rank of the last stage calls it) and returns a tensor whose first dim
    is m. An interleaved pipeline needs at least PP micro-batches: short batches are padded with
    repeats whose results are dropped.
    """
    b, s = tokens.shape
    device = next(chunks[0].parameters()).device
    if b % micro_batch_size:
        raise ValueError(
            f"batch of {b} rows is not a multiple of micro_batch_size {micro_batch_size}"
        )
    rows = list(tokens.to(device).split(micro_batch_size))
    real = len(rows)
    n_chunks = len(chunks)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if n_chunks > 1 and len(rows) < pp:
        rows += [rows[-1]] * (pp - len(rows))
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(micro_batch_size, -1)

    def step(data_iterator: Iterator[torch.Tensor], model: torch.nn.Module):
        output = model(next(data_iterator), position_ids, attention_mask=None)

        def finish(logits: torch.Tensor, non_loss_data: bool = False) -> torch.Tensor:
            return reduce(logits)

        return output, finish

    iterators = [iter(rows) for _ in range(n_chunks)]
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iterators if n_chunks > 1 else iterators[0],
            model=chunks if n_chunks > 1 else chunks[0],
            num_microbatches=len(rows),
            seq_length=s,
            micro_batch_size=micro_batch_size,
            forward_only=True,
            collect_non_loss_data=True,
        )
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    result = torch.cat(outputs[:real]) if last else None
    return broadcast_from_last_stage(result, device)


def full_logits(
    chunks: list[torch.nn.Module], tokens: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Whole [b, s, V] fp32 logits on every rank (parity checks; costly for big vocabularies)."""
    return forward_reduce(chunks, tokens, lambda lg: gather_vocab(lg.float(), vocab_size))
