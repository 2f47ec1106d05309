"""Tyr-the-Pruner's local pruner: which input columns of a row-parallel projection to remove
(whole attention heads of ``linear_proj``, FFN neurons of ``linear_fc2``), chosen greedily by the
Optimal Brain Surgeon error, and a least-squares refit of the kept columns.

With X [tokens, c] the projection's input on calibration tokens and H = X^T X (+ damping), the
layer's output error of replacing W [h, c] by W' is ``tr((W - W') H (W - W')^T)``. Removing a
group G of columns (one head: its d columns; one neuron: one column) and re-fitting the rest
optimally costs ``tr(W_G (Hinv_GG)^-1 W_G^T)`` (OBS); the cheapest group goes first, then W and
Hinv are updated (Schur complement) as if it were never there. One greedy pass yields a nested
removal order, so every width of a layer comes from the same order.

The kept weights are then refit exactly: ``W_K = W H_{:,K} (H_KK)^-1`` minimises the output
error over the calibration tokens given the kept columns K (what the OBS updates approximate
step by step). All of it runs in fp64 on the CPU; nothing here touches torch.distributed.
"""

from __future__ import annotations

import torch

DEFAULT_DAMPING = 0.01  # of H's mean diagonal, added to its diagonal (methods.md: 1%)


def damped(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """H + damping * mean(diag H) * I in fp64 (a dead column would make H singular)."""
    h = gram.double()
    bump = damping * float(h.diagonal().mean()) or damping
    return h + bump * torch.eye(h.shape[0], dtype=torch.float64)


def removal_order(weight: torch.Tensor, gram: torch.Tensor, unit: int, *,
                  balance: int = 1, count: int | None = None,
                  damping: float = DEFAULT_DAMPING) -> list[int]:  # fmt: skip
    """Units (groups of ``unit`` consecutive input columns) in the order greedy OBS removes them.

    ``balance`` > 1 splits the units into that many equal consecutive blocks (query groups: a
    head's heads-per-group must stay equal across groups) and removes in rounds, one unit from
    every block per round, so after r rounds every block has lost r units. ``count``: stop
    after that many units (default: all but the last round).

    Example: 4 heads in 2 groups (balance 2): an order such as [1, 2, 0, 3] leaves heads {0, 3}
    after one round, one head per group.
    """
    w = weight.double().clone()  # [h, c]
    hinv = torch.linalg.inv(damped(gram, damping))
    units = w.shape[1] // unit
    per_block = units // balance
    count = units - balance if count is None else count
    alive = torch.ones(units, dtype=torch.bool)
    order: list[int] = []
    while len(order) < count:
        lost = [0] * balance
        for u in order:
            lost[u // per_block] += 1
        floor = min(lost)  # blocks still to lose a unit this round
        candidates = [u for u in range(units)
                      if alive[u] and lost[u // per_block] == floor]  # fmt: skip
        if unit == 1:  # neurons: every cost in one vectorised expression
            index = torch.tensor(candidates)
            costs = (w[:, index].square().sum(0) / hinv.diagonal()[index]).tolist()
        else:
            costs = []
            for u in candidates:
                cols = slice(u * unit, (u + 1) * unit)
                w_g, h_gg = w[:, cols], hinv[cols, cols]
                costs.append(float((w_g @ torch.linalg.inv(h_gg) * w_g).sum()))
        u = candidates[min(range(len(costs)), key=lambda k: (costs[k], candidates[k]))]
        cols = slice(u * unit, (u + 1) * unit)
        step = torch.linalg.inv(hinv[cols, cols]) @ hinv[cols, :]  # [unit, c]
        w -= w[:, cols] @ step
        hinv -= hinv[:, cols] @ step
        w[:, cols] = 0
        hinv[cols, :] = 0
        hinv[:, cols] = 0
        alive[u] = False
        order.append(u)
    return order


def kept_columns(order: list[int], removed: int, units: int, unit: int) -> torch.Tensor:
    """Column indices (ascending) kept after removing the first ``removed`` units of ``order``."""
    gone = set(order[:removed])
    keep = [u for u in range(units) if u not in gone]
    return torch.tensor([u * unit + k for u in keep for k in range(unit)], dtype=torch.long)


def prune_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor,
    *,
    refit: bool = True,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """``weight`` [h, c] with the columns outside ``keep`` zeroed and, with ``refit``, the kept
    columns least-squares refit to the dense output on the calibration statistics ``gram``.
    Keeping every column returns the weight unchanged (bit for bit): there is nothing to
    compensate. The result has ``weight``'s dtype and shape: a zero input column computes what
    the structurally pruned layer computes."""
    if keep.numel() == weight.shape[1]:
        return weight.clone()
    out = torch.zeros_like(weight)
    if not refit:
        out[:, keep] = weight[:, keep]
        return out
    h = damped(gram, damping)
    rhs = weight.double() @ gram.double()[:, keep]  # W H_{:,K}: the dense output's correlations
    fitted = torch.linalg.solve(h[keep][:, keep], rhs.t()).t()  # H_KK symmetric
    out[:, keep] = fitted.to(weight.dtype)
    return out


def output_error(weight: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W - W') H (W - W')^T): the summed squared output error over the calibration tokens."""
    diff = (weight.double() - pruned.double())
    return float((diff @ gram.double() * diff).sum())
