"""KL divergence between teacher and student logits that are split over the vocabulary (TP),
without ever gathering a full-vocabulary tensor.

Notation: c tokens in a chunk, V/t this rank's vocabulary shard, T the temperature, s and t the
student's and teacher's logits divided by T, Z their partition functions over the whole
vocabulary. With p = softmax(t) and q = softmax(s):

  forward  KL(p || q) = sum_v p_v (t_v - s_v) - log Z_t + log Z_s
  reverse  KL(q || p) = sum_v q_v (s_v - t_v) - log Z_s + log Z_t

Each log Z is max + log(sum exp(x - max)) with the max all-reduced (MAX, detached) and the sum
all-reduced (SUM); the sums over v are local sums all-reduced (SUM). The student's all-reduces
are differentiable with "reduce forward, copy backward" semantics: every TP rank holds the same
loss, and each rank's gradient flows only into its own shard. Tokens are processed in chunks so
the fp32 temporaries stay [chunk, V/t].

Top-k variant (forward KL only): the teacher keeps its k most likely tokens per position,
renormalised over them; the student keeps its full-vocabulary softmax. It is the same formula
with the teacher's support restricted, so ``p_v = 0`` outside the top k. The k-th largest
teacher logit is found from each rank's local top k, gathered over TP (c x k values per rank).
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


class VocabMismatchError(ValueError):
    pass


def _all_reduce(x: torch.Tensor, group, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(x, op=op, group=group)
    return x


def _log_partition(x: torch.Tensor, group, differentiable: bool) -> torch.Tensor:
    """log sum_v exp(x_v) over the whole (split) vocabulary; x: [c, V/t] -> [c]."""
    peak = _all_reduce(x.detach().amax(-1), group, torch.distributed.ReduceOp.MAX)
    local = torch.exp(x - peak[:, None]).sum(-1)
    total = (
        reduce_from_tensor_model_parallel_region(local, group)
        if differentiable
        else _all_reduce(local, group)
    )
    return peak + torch.log(total)


def _top_k_support(t: torch.Tensor, k: int, group) -> torch.Tensor:
    """[c, V/t] bool: True where the teacher logit is among the k largest of the whole row
    (ties at the k-th value are all kept)."""
    local = t.topk(min(k, t.shape[-1]), dim=-1).values
    if group is not None and torch.distributed.get_world_size(group) > 1:
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        local = torch.cat(parts, -1)
    threshold = local.topk(min(k, local.shape[-1]), dim=-1).values[:, -1:]
    return t >= threshold


def _chunk_kl(
    s: torch.Tensor,
    t: torch.Tensor,
    valid: torch.Tensor | None,
    reverse: bool,
    group,
    top_k: int | None = None,
):
    if top_k is not None:
        support = _top_k_support(t, top_k, group)
        valid = support if valid is None else support & valid
        t = torch.where(support, t, torch.full_like(t, torch.finfo(torch.float32).min))
    log_zs = _log_partition(s, group, differentiable=True)
    with torch.no_grad():
        log_zt = _log_partition(t, group, differentiable=False)
    diff = s - t  # finite: padding entries hold -inf in neither (masked below)
    if reverse:
        # q depends on log Z_s; each rank's local sum contributes to that gradient, so it must
        # be summed over TP (copy forward, all-reduce backward) before reaching log Z_s.
        shared_log_zs = copy_to_tensor_model_parallel_region(log_zs, group)
        weights = torch.exp(s - shared_log_zs[:, None])  # q, differentiable
        local = weights * diff
    else:
        weights = torch.exp(t - log_zt[:, None])  # p, constant
        local = weights * -diff
    if valid is not None:
        local = torch.where(valid, local, torch.zeros_like(local))
    cross = reduce_from_tensor_model_parallel_region(local.sum(-1), group)
    return cross - log_zs + log_zt if reverse else cross - log_zt + log_zs


def vocab_parallel_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    reverse: bool = False,
    scale_by_t2: bool = True,
    top_k: int | None = None,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Per-token KL, [..] = the logits' leading dims; logits are [..., V/t] shards.

    ``vocab_start`` is the first vocabulary id of this rank's shard and ``vocab_size`` the real
    vocabulary: ids at or beyond it are padding and get no probability. Teacher and student must
    share the (padded) split; a genuinely different vocabulary is refused. ``top_k`` restricts
    the teacher to its k most likely tokens (forward KL only).
    """
    if top_k is not None and (reverse or top_k < 1):
        raise ValueError("top_k needs forward KL and k >= 1 (reverse KL over a truncated "
                         "teacher is unbounded)")  # fmt: skip
    if student.shape != teacher.shape:
        raise VocabMismatchError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ: distillation over the full vocabulary needs the same tokenizer (padding "
            "aside, handled by vocab_size)"
        )
    lead, width = student.shape[:-1], student.shape[-1]
    s_all = student.reshape(-1, width)
    t_all = teacher.detach().reshape(-1, width)
    valid = None
    if vocab_size is not None and vocab_start + width > vocab_size:
        ids = torch.arange(vocab_start, vocab_start + width, device=student.device)
        valid = (ids < vocab_size)[None, :]
    out = []
    for start in range(0, s_all.shape[0], chunk_tokens):
        s = s_all[start : start + chunk_tokens].float() / temperature
        t = t_all[start : start + chunk_tokens].float() / temperature
        if valid is not None:
            neg = torch.finfo(torch.float32).min
            s = torch.where(valid, s, torch.full_like(s, neg))
            t = torch.where(valid, t, torch.full_like(t, neg))
        out.append(_chunk_kl(s, t, valid, reverse, group, top_k))
    kl = torch.cat(out).reshape(lead)
    return kl * temperature**2 if scale_by_t2 else kl


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    chunk_tokens: int = 4096,
) -> torch.Tensor:
    """Per-token LM cross-entropy -log softmax(logits)[label] over TP-split logits [..., V/t],
    in fp32 and chunks like :func:`vocab_parallel_kl`; padding ids (>= vocab_size) get no
    probability, unlike Megatron's own vocab-parallel cross-entropy."""
    lead, width = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, width)
    targets = labels.reshape(-1) - vocab_start
    ids = torch.arange(vocab_start, vocab_start + width, device=logits.device)
    valid = None if vocab_size is None else (ids < vocab_size)[None, :]
    out = []
    for start in range(0, flat.shape[0], chunk_tokens):
        s = flat[start : start + chunk_tokens].float()
        if valid is not None:
            s = torch.where(valid, s, torch.full_like(s, torch.finfo(torch.float32).min))
        target = targets[start : start + chunk_tokens]
        mine = (target >= 0) & (target < width)
        picked = s.gather(-1, target.clamp(0, width - 1)[:, None])[:, 0]
        picked = reduce_from_tensor_model_parallel_region(
            torch.where(mine, picked, torch.zeros_like(picked)), group
        )
        out.append(_log_partition(s, group, differentiable=True) - picked)
    return torch.cat(out).reshape(lead)
