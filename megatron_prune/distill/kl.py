"""Distillation losses over logits split along the vocabulary (TP), without ever gathering a
full-vocabulary tensor, with memory bounded by a chunk of tokens in the forward *and* backward.

Notation: V/t this rank's vocabulary shard, T the temperature, s and t the student's and
teacher's logits divided by T, Z their partition functions over the whole vocabulary,
p = softmax(t), q = softmax(s), per token:

  forward KL(p || q) = sum_v p_v (t_v - s_v) - log Z_t + log Z_s     dKL/ds = q - p
  reverse KL(q || p) = sum_v q_v (s_v - t_v) - log Z_s + log Z_t     dKL/ds = q (log q - log p - KL)
  cross-entropy      = log Z_s - s_label   (T = 1)                   dCE/ds = q - onehot(label)

(derivatives with respect to s; the logits' gradient is that divided by T, times T^2 when the
loss is scaled by T^2). Each log Z is max + log(sum exp(x - max)), the max all-reduced (MAX) and
the sum all-reduced (SUM) over TP; sums over v are local sums all-reduced. Every TP rank holds
the same per-token loss and writes the gradient of its own shard.

Memory: autograd would keep every chunk's fp32 temporaries until the backward pass, so the loss
is one autograd function that saves only the logits it was given plus a few numbers per token,
and recomputes the softmaxes chunk by chunk in the backward pass: its extra memory is a few
[chunk, V/t] fp32 tensors, whatever the number of tokens.

Top-k variant (forward KL only): the teacher keeps its k most likely tokens per position,
renormalised over them (p_v = 0 elsewhere); the student keeps its full softmax. The k-th largest
teacher logit comes from each rank's local top k, gathered over TP, and is saved for backward.
Padding ids (>= vocab_size) get no probability in either model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from megatron_prune.errors import UserError

_NEG = torch.finfo(torch.float32).min


class VocabMismatchError(UserError):
    pass


def _check_group(group: ProcessGroup) -> None:
    """The vocabulary's TP group must be named: torch reads ``group=None`` as the whole world,
    which is never the vocabulary split here (a whole vocabulary is a group of one, e.g.
    megatron's TP group at TP=1)."""
    if group is None:
        raise TypeError(
            "pass the process group the vocabulary is split over (megatron's tensor-parallel "
            "group; at TP=1 a group of one), not None"
        )


def _all_reduce(
    x: torch.Tensor, group: ProcessGroup, op=torch.distributed.ReduceOp.SUM
) -> torch.Tensor:
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(x, op=op, group=group)
    return x


def _log_partition(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """log sum_v exp(x_v) over the whole (split) vocabulary; x: [c, V/t] -> [c]."""
    peak = _all_reduce(x.amax(-1), group, torch.distributed.ReduceOp.MAX)
    return peak + torch.log(_all_reduce(torch.exp(x - peak[:, None]).sum(-1), group))


def _top_k_threshold(t: torch.Tensor, k: int, group: ProcessGroup) -> torch.Tensor:
    """[c, 1]: the k-th largest teacher logit of each row over the whole vocabulary."""
    local = t.topk(min(k, t.shape[-1]), dim=-1).values
    if torch.distributed.get_world_size(group) > 1:
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        local = torch.cat(parts, -1)
    return local.topk(min(k, local.shape[-1]), dim=-1).values[:, -1:]


@dataclass(frozen=True)
class _Spec:
    kind: str  # "forward" | "reverse" | "ce"
    group: ProcessGroup
    vocab_start: int
    vocab_size: int | None
    temperature: float
    scale: float
    top_k: int | None
    chunk: int

    def valid(self, width: int, device: torch.device) -> torch.Tensor | None:
        """[1, V/t] bool, False on padding ids; None when the shard holds no padding."""
        if self.vocab_size is None or self.vocab_start + width <= self.vocab_size:
            return None
        ids = torch.arange(self.vocab_start, self.vocab_start + width, device=device)
        return (ids < self.vocab_size)[None, :]

    def scaled(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        x = x.float() / self.temperature
        return x if valid is None else torch.where(valid, x, _NEG)


class _ChunkedVocabLoss(torch.autograd.Function):
    """Per-token loss of student logits [N, V/t] against teacher logits [N, V/t] (KL) or
    labels [N] (CE); see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, other: torch.Tensor, spec: _Spec) -> torch.Tensor:
        n, width = student.shape
        valid = spec.valid(width, student.device)
        loss = torch.empty(n, dtype=torch.float32, device=student.device)
        log_zs = torch.empty_like(loss)
        log_zt = torch.empty_like(loss)
        threshold = torch.full((n, 1), _NEG, device=student.device)
        for lo in range(0, n, spec.chunk):
            hi = min(lo + spec.chunk, n)
            s = spec.scaled(student[lo:hi], valid)
            log_zs[lo:hi] = _log_partition(s, spec.group)
            if spec.kind == "ce":
                target = other[lo:hi] - spec.vocab_start
                mine = (target >= 0) & (target < width)
                picked = s.gather(-1, target.clamp(0, width - 1)[:, None])[:, 0]
                picked = _all_reduce(torch.where(mine, picked, 0.0), spec.group)
                loss[lo:hi] = log_zs[lo:hi] - picked
                continue
            t = spec.scaled(other[lo:hi], valid)
            support = valid
            if spec.top_k is not None:
                threshold[lo:hi] = _top_k_threshold(t, spec.top_k, spec.group)
                keep = t >= threshold[lo:hi]
                support = keep if support is None else keep & support
                t = torch.where(keep, t, _NEG)
            log_zt[lo:hi] = _log_partition(t, spec.group)
            if spec.kind == "reverse":
                local = torch.exp(s - log_zs[lo:hi, None]) * (s - t)
            else:
                local = torch.exp(t - log_zt[lo:hi, None]) * (t - s)
            if support is not None:
                local = torch.where(support, local, 0.0)
            cross = _all_reduce(local.sum(-1), spec.group)
            if spec.kind == "reverse":
                loss[lo:hi] = cross - log_zs[lo:hi] + log_zt[lo:hi]
            else:
                loss[lo:hi] = cross - log_zt[lo:hi] + log_zs[lo:hi]
        ctx.spec = spec
        ctx.save_for_backward(student, other, log_zs, log_zt, loss, threshold)
        return loss * spec.scale

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        student, other, log_zs, log_zt, loss, threshold = ctx.saved_tensors
        spec: _Spec = ctx.spec
        n, width = student.shape
        valid = spec.valid(width, student.device)
        grad = torch.empty_like(student)
        factor = grad_loss.float() * (spec.scale / spec.temperature)
        for lo in range(0, n, spec.chunk):
            hi = min(lo + spec.chunk, n)
            s = spec.scaled(student[lo:hi], valid)
            q = torch.exp(s - log_zs[lo:hi, None])  # 0 on padding
            if spec.kind == "ce":
                target = other[lo:hi] - spec.vocab_start
                rows = torch.nonzero((target >= 0) & (target < width))[:, 0]
                q[rows, target[rows]] -= 1.0
                g = q
            else:
                t = spec.scaled(other[lo:hi], valid)
                if spec.top_k is not None:
                    t = torch.where(t >= threshold[lo:hi], t, _NEG)
                log_p = t - log_zt[lo:hi, None]
                if spec.kind == "reverse":
                    g = q * ((s - log_zs[lo:hi, None]) - log_p - loss[lo:hi, None])
                    g = torch.where(q > 0, g, 0.0)  # q = 0 on padding: no gradient, no 0 * inf
                else:
                    g = q - torch.exp(log_p)
            grad[lo:hi] = (g * factor[lo:hi, None]).to(grad.dtype)
        return grad, None, None


def vocab_parallel_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    group: ProcessGroup,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    reverse: bool = False,
    scale_by_t2: bool = True,
    top_k: int | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-token KL, [..] = the logits' leading dims; logits are [..., V/t] shards.

    ``vocab_start`` is the first vocabulary id of this rank's shard and ``vocab_size`` the real
    vocabulary: ids at or beyond it are padding and get no probability. Teacher and student must
    share the (padded) split; a genuinely different vocabulary is refused. ``top_k`` restricts
    the teacher to its k most likely tokens (forward KL only). The teacher gets no gradient.
    ``group`` (required) is the group the vocabulary is split over; collectives are skipped
    when it has one rank.
    """
    _check_group(group)
    if student.shape != teacher.shape:
        raise VocabMismatchError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
            "differ: distillation over the full vocabulary needs the same tokenizer (padding "
            "aside, handled by vocab_size)"
        )
    if top_k is not None and (reverse or top_k < 1):
        raise ValueError("top_k needs forward KL and k >= 1 (reverse KL over a truncated "
                         "teacher is unbounded)")  # fmt: skip
    spec = _Spec(
        kind="reverse" if reverse else "forward", group=group, vocab_start=vocab_start,
        vocab_size=vocab_size, temperature=temperature,
        scale=temperature**2 if scale_by_t2 else 1.0, top_k=top_k, chunk=chunk_tokens,
    )  # fmt: skip
    width = student.shape[-1]
    flat = _ChunkedVocabLoss.apply(
        student.reshape(-1, width), teacher.detach().reshape(-1, width), spec
    )
    return flat.reshape(student.shape[:-1])


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group: ProcessGroup,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
) -> torch.Tensor:
    """Per-token LM cross-entropy -log softmax(logits)[label] over TP-split logits [..., V/t],
    chunked like :func:`vocab_parallel_kl`; padding ids (>= vocab_size) get no probability,
    unlike Megatron's own vocab-parallel cross-entropy. ``group`` as for the KL."""
    _check_group(group)
    spec = _Spec(kind="ce", group=group, vocab_start=vocab_start, vocab_size=vocab_size,
                 temperature=1.0, scale=1.0, top_k=None, chunk=chunk_tokens)  # fmt: skip
    width = logits.shape[-1]
    flat = _ChunkedVocabLoss.apply(logits.reshape(-1, width), labels.reshape(-1), spec)
    return flat.reshape(logits.shape[:-1])
