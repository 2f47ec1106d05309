"""Heavy-tail exponents of weight spectra (AlphaPruning), computed shard-aware.

For W with singular values s, the eigenvalues are lambda = s^2, i.e. the eigenvalues of the
Gram matrix. A column-parallel W (rows split over TP) gives W^T W = sum_r W_r^T W_r; a
row-parallel W (columns split) gives W W^T = sum_r W_r W_r^T. Each rank forms its local Gram
([h, h] for every matrix of a block), one all-reduce over the TP group sums them, and no rank
ever holds the whole matrix.

Power-law fit (Hill estimator) at cut index i over ascending eigenvalues (xmin = lambda_i,
n = N - i): alpha = 1 + n / sum_{j>=i} ln(lambda_j / lambda_i).
* ``xmin_mid``: i = N // 2.
* ``xmin_peak``: candidates i whose lambda_i is at most 1.5x the peak of a 100-bin histogram of
  log10(lambda); keep the alpha with the smallest Kolmogorov-Smirnov distance
  D = max_j |1 - (lambda_{i+j}/lambda_i)^(1-alpha) - j/n|.
"""

from __future__ import annotations

import torch

from megatron_prune.errors import UserError


def hill_alpha(eigs: torch.Tensor, i: int) -> tuple[float, float]:
    """(alpha, KS distance) of the tail eigs[i:] (ascending)."""
    tail = eigs[i:].double()
    n = tail.numel()
    logs = torch.log(tail / tail[0])
    denom = float(logs.sum())
    if n < 2 or denom <= 0:
        return float("nan"), float("inf")
    alpha = 1.0 + n / denom
    fitted = 1 - (tail / tail[0]) ** (1 - alpha)
    empirical = torch.arange(n, dtype=torch.float64) / n
    return alpha, float((fitted - empirical).abs().max())


def esd_alpha(eigs: torch.Tensor, method: str = "xmin_peak") -> float:
    """AlphaPruning's alpha of one matrix from its (any order) eigenvalues lambda = s^2."""
    eigs = torch.sort(eigs.double().clamp_min(0)).values
    eigs = eigs[eigs > eigs[-1] * 1e-12]  # drop numerical zeros (rank-deficient Grams)
    n = eigs.numel()
    if n < 4:
        return float("nan")
    if method == "xmin_mid":
        return hill_alpha(eigs, n // 2)[0]
    if method != "xmin_peak":
        raise UserError(f"unknown ESD method {method!r}: xmin_mid or xmin_peak")
    log_eigs = torch.log10(eigs)
    counts = torch.histc(log_eigs, bins=100, min=float(log_eigs[0]), max=float(log_eigs[-1]))
    width = (log_eigs[-1] - log_eigs[0]) / 100
    peak = 10 ** float(log_eigs[0] + width * (int(counts.argmax()) + 0.5))
    candidates = [i for i in range(n - 1) if eigs[i] <= 1.5 * peak] or [n // 2]
    best = min((hill_alpha(eigs, i) for i in candidates), key=lambda r: r[1])
    return best[0]


def gram_eigenvalues(local: torch.Tensor, split_rows: bool, tp_group) -> torch.Tensor:
    """Eigenvalues of W^T W (``split_rows``: W's rows are split over TP) or W W^T (columns split),
    from this rank's shard ``local``; collective over ``tp_group``."""
    w = local.double()
    gram = w.t() @ w if split_rows else w @ w.t()
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(gram, group=tp_group)
    return torch.linalg.eigvalsh(gram)


MATRICES = ("q", "k", "v", "proj", "gate", "up", "down")


def layer_matrices(layer: torch.nn.Module, arch) -> dict[str, tuple[torch.Tensor, bool]]:
    """This rank's shard of each weight matrix of a block, with whether its rows are split.

    The local QKV shard holds whole query groups, [q_0..q_{p-1}, k, v] per group (see FuseQKV),
    so Q, K and V are sliced out per group; the local FC1 shard is [gate_r; up_r].
    """
    p, d = arch.num_attention_heads // arch.num_query_groups, arch.head_dim
    qkv = layer.self_attention.linear_qkv.weight.detach()
    h = qkv.shape[1]
    grouped = qkv.view(-1, (p + 2) * d, h)
    q, k, v = grouped.split([p * d, d, d], dim=1)
    gate, up = layer.mlp.linear_fc1.weight.detach().chunk(2)
    return {
        "q": (q.reshape(-1, h), True),
        "k": (k.reshape(-1, h), True),
        "v": (v.reshape(-1, h), True),
        "proj": (layer.self_attention.linear_proj.weight.detach(), False),
        "gate": (gate, True),
        "up": (up, True),
        "down": (layer.mlp.linear_fc2.weight.detach(), False),
    }
