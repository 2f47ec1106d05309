"""Allocation strategies: a budget in, a target (per-layer widths valid at TP x PP) out.

Both strategies pick from the same grid of valid values, and every choice is the minimum of an
objective that does not mention TP, with ties broken towards larger widths. The grid at TP=3 is
a subset of the grid at TP=1, so whenever the TP=1 plan is valid at TP=3 it *is* the TP=3 plan,
with one exception: a dimension with a single valid value at a layout (SmolLM2's 3 query groups
at TP=3) drops out of the "equal fractions" objective there, so ``--prune groups`` plans can
differ between TP=1 and TP=3.

Grid (``--prune`` names the dimensions that may shrink; the others keep the source's value):

* ``ffn``: multiples of ``lcm(step, TP)`` up to the source FFN, where ``step`` is the largest
  divisor of the source FFN that is at most 1/128 of it (:func:`step_of`). A plan is then the
  same at every TP that divides ``step`` (SmolLM2: FFN 1536, step 12: TP 1, 2, 3, 4, 6, 12).
* ``heads``: query heads per group, 1..source's; ``groups``: query groups, multiples of TP up
  to the source's. Head counts stay multiples of TP and of the group count.
* ``hidden``: multiples of :func:`step_of` the hidden size; ``depth``: layer counts divisible
  by PP (Block Influence picks the layers when ``prune`` runs).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch
from megatron_prune.plan.cost import (
    TOLERANCE,
    Budget,
    LayerShape,
    layer_shapes,
)

STRATEGIES = ("uniform", "alpha", "tyr")  # tyr: plan/tyr/ (weights and text)
DIMS = ("hidden", "ffn", "heads", "groups", "depth")
DEFAULT_DIMS = ("ffn", "heads")
ALPHA_DIMS = ("ffn", "heads", "groups")  # per-layer widths; hidden and depth are global
DEFAULT_ALPHA_EPS = 0.3  # methods.md: eps 0.2-0.3


def parse_dims(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"ffn,heads"`` -> ("ffn", "heads") in :data:`DIMS` order; refuses unknown names."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [s for s in names if s]
    bad = sorted(set(names) - set(DIMS))
    if bad or not names:
        raise UserError(f"--prune {spec!r}: name dimensions from {list(DIMS)}, comma-separated")
    return tuple(d for d in DIMS if d in names)


def step_of(value: int, parts: int = 128) -> int:
    """The largest divisor of ``value`` that is at most ``value // parts`` (at least 1): widths
    move in steps of at most 1/``parts`` of the source, and the step depends only on the source.

    Examples: 1536 -> 12 (1536 = 128 x 12); 576 -> 4; 128 -> 1; 4864 (= 2^8 x 19) -> 38.
    """
    limit = max(1, value // parts)
    return max(k for k in range(1, limit + 1) if value % k == 0)


@dataclass(frozen=True)
class Grid:
    """Every value each dimension may take at one layout (ascending)."""

    hidden: tuple[int, ...]
    ffn: tuple[int, ...]
    heads: tuple[tuple[int, int], ...]  # (num_attention_heads, num_query_groups)
    depth: tuple[int, ...]
    moves: tuple[str, ...]  # the pruned dimensions that have more than one value here

    def ratios(self, source: ModelArch, hidden: int, heads: tuple[int, int], layers: int,
               ffn: int | None) -> list[float]:  # fmt: skip
        """The kept fraction of each dimension that moves (``ffn`` None: leave it out)."""
        out = {"hidden": hidden / source.hidden_size, "depth": layers / source.num_layers,
               "heads": heads[0] / source.num_attention_heads,
               "groups": heads[1] / source.num_query_groups}  # fmt: skip
        if ffn is not None:
            out["ffn"] = ffn / source.ffn_hidden_size
        return [out[d] for d in self.moves if d in out]


def make_grid(source: ModelArch, dims: Sequence[str], tp: int, pp: int) -> Grid:
    h, f, n, g, layers = (source.hidden_size, source.ffn_hidden_size, source.num_attention_heads,
                          source.num_query_groups, source.num_layers)  # fmt: skip
    per_group = n // g
    q = math.lcm(step_of(f), tp)
    ffn = tuple(range(q, f + 1, q)) if "ffn" in dims else (f,)
    hidden = tuple(range(step_of(h), h + 1, step_of(h))) if "hidden" in dims else (h,)
    depth = tuple(range(pp, layers + 1, pp)) if "depth" in dims else (layers,)
    group_counts = range(tp, g + 1, tp) if "groups" in dims else (g,)
    heads_per_group = range(1, per_group + 1) if "heads" in dims else (per_group,)
    heads = tuple(sorted((gg * p, gg) for gg in group_counts for p in heads_per_group
                         if gg % tp == 0 and (gg * p) % tp == 0))  # fmt: skip
    if not ffn or not heads or not depth:
        raise UserError(
            f"no valid widths at TP={tp}, PP={pp} for this model (FFN {f}, {n} heads in {g} "
            f"groups, {layers} layers): choose a layout the model allows"
        )
    options = {"hidden": len(hidden), "ffn": len(ffn), "depth": len(depth),
               "groups": len({gg for _, gg in heads}),
               "heads": max(sum(1 for _, gg in heads if gg == k) for k in group_counts)}
    moves = tuple(d for d in dims if options[d] > 1)
    return Grid(hidden, ffn, heads, depth, moves)


def _shape(base: LayerShape, hidden: float, heads: tuple[float, float], ffn: float) -> LayerShape:
    return replace(base, hidden=hidden, heads=heads[0], groups=heads[1], ffn=ffn)


# ------------------------------------------------------------------------------------ uniform


def uniform(source: ModelArch, budget: Budget, dims: Sequence[str], tp: int = 1, pp: int = 1,
            seq_len: int = 2048) -> dict:  # fmt: skip
    """One width ratio on every layer: among the grid points that meet the budget, the one whose
    pruned dimensions keep the most equal fractions (smallest max - min), then the closest to the
    budget. The FFN, the finest dimension, absorbs what the coarse head counts cannot match.

    Cost of a grid point: the source's layers with the new widths, times ``layers / L`` (exact
    for uniform models; with local and global layers, the average kind stays).
    """
    shapes = layer_shapes(source)
    dense = budget.blocks_cost(source, shapes, seq_len)
    lo, hi = (budget.keep * (1 - TOLERANCE) * dense, budget.keep * (1 + TOLERANCE) * dense)
    grid = make_grid(source, dims, tp, pp)
    best: tuple | None = None
    closest: tuple[float, float, dict] | None = None
    for hidden in grid.hidden:
        for heads in grid.heads:
            new = [_shape(s, hidden, heads, 0) for s in shapes]
            for layers in grid.depth:
                scale = layers / source.num_layers
                base = scale * budget.blocks_cost(source, new, seq_len)
                per_neuron = scale * sum(
                    budget.layer_cost(source, replace(s, ffn=1), seq_len)
                    for s in new) - base  # fmt: skip
                for ffn in _ffn_choices(grid.ffn, base, per_neuron, lo, hi, "ffn" in dims):
                    cost = base + per_neuron * ffn
                    point = dict(hidden_size=hidden, num_layers=layers, ffn_hidden_size=ffn,
                                 num_attention_heads=heads[0], num_query_groups=heads[1])
                    miss = abs(cost / dense - budget.keep)
                    if closest is None or miss < closest[0]:
                        closest = (miss, cost / dense, point)
                    if not lo <= cost <= hi:
                        continue
                    ratios = grid.ratios(source, hidden, heads, layers, ffn)
                    spread = max(ratios, default=0) - min(ratios, default=0)
                    key = (spread, miss, *(-v for v in point.values()))
                    if best is None or key < best[0]:
                        best = (key, point)
    if best is None:
        near = f" (closest: {closest[2]}, {closest[1]:.4f} of the dense cost)" if closest else ""
        raise UserError(
            f"no uniform plan meets --budget {budget} within {TOLERANCE:.0%} at TP={tp}, "
            f"PP={pp} pruning {list(dims)}{near}: prune more dimensions (--prune) or change "
            "the budget"
        )
    return best[1]


def _ffn_choices(values: Sequence[int], base: float, per_neuron: float, lo: float, hi: float,
                 pruned: bool) -> Sequence[int]:  # fmt: skip
    """The FFN widths worth trying (``values`` ascending): those whose cost lands in [lo, hi],
    or else the nearest one (so a miss can be reported); the one fixed width when not pruned."""
    if not pruned:
        return values
    first = bisect.bisect_left(values, (lo - base) / per_neuron)
    last = bisect.bisect_right(values, (hi - base) / per_neuron)
    if first < last:
        return values[first:last]
    near = values[max(0, min(first, len(values) - 1))], values[max(0, first - 1)]
    return [min(near, key=lambda f: abs(base + per_neuron * f - (lo + hi) / 2))]


# -------------------------------------------------------------------------------------- alpha


def block_alphas(scores: dict) -> np.ndarray:
    """One alpha per layer: the mean over a block's matrices (``esd/alpha`` [L, 7], NaN fits of
    tiny matrices skipped), or ``esd/block_alpha`` [L] when only that is there."""
    if "esd/alpha" in scores:
        table = np.asarray(scores["esd/alpha"], dtype=np.float64)
        with np.errstate(all="ignore"):
            alphas = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in table])
    elif "esd/block_alpha" in scores:
        alphas = np.asarray(scores["esd/block_alpha"], dtype=np.float64)
    else:
        raise UserError("--strategy alpha needs ESD alphas: score with `--metrics esd` first")
    if not np.isfinite(alphas).all():
        bad = [int(i) for i in np.flatnonzero(~np.isfinite(alphas))]
        raise UserError(f"ESD alphas of layers {bad} are not finite (matrices too small to fit)")
    return alphas


def alpha_keep_ratios(alphas: Sequence[float], keep: float, eps: float = DEFAULT_ALPHA_EPS,
                      weights: Sequence[float] | None = None) -> np.ndarray:  # fmt: skip
    """AlphaPruning's per-layer keep ratios, whose ``weights``-weighted mean is ``keep``.

    Layer l's pruned share is proportional to ``s_l = (1 - eps) + 2*eps*(a_l - a_min) /
    (a_max - a_min)``: a higher alpha (a less heavy-tailed, less well trained layer) loses more.
    The shares are scaled so the weighted mean sparsity is ``1 - keep``; shares above 1 are
    clipped and the others scaled up again until the mean holds (their code does not clip).

    Example: alphas [2, 3, 4], keep 0.5, eps 0.3: s = [0.7, 1.0, 1.3], sparsity 0.5 * s =
    [0.35, 0.5, 0.65], keep ratios [0.65, 0.5, 0.35].
    """
    a = np.asarray(alphas, dtype=np.float64)
    w = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if not 0 <= eps < 1:
        raise UserError(f"--alpha-eps {eps}: must be in [0, 1)")
    if not 0 <= keep <= 1:
        raise UserError(f"keep ratio {keep} outside [0, 1]")
    span = a.max() - a.min()
    s = (1 - eps) + 2 * eps * ((a - a.min()) / span if span > 0 else np.full_like(a, 0.5))
    target = (1 - keep) * w.sum()  # the weighted sum of sparsities to reach
    sparsity = (1 - keep) * s * w.sum() / (w * s).sum()
    for _ in range(len(a) + 1):
        sparsity = np.clip(sparsity, 0.0, 1.0)
        free = sparsity < 1.0
        missing = target - (w * sparsity).sum()
        if abs(missing) <= 1e-12 * max(1.0, target) or not free.any():
            break
        sparsity[free] *= 1 + missing / (w[free] * sparsity[free]).sum()
    return 1.0 - sparsity


def _continuous_ratio(source: ModelArch, budget: Budget, dims: Sequence[str], base: LayerShape,
                      target: float, seq_len: int) -> float:  # fmt: skip
    """The r in [0, 1] at which scaling the pruned per-layer dimensions by r costs ``target``."""

    def cost(r: float) -> float:
        k = {d: (r if d in dims else 1.0) for d in ALPHA_DIMS}
        heads = (base.heads * k["heads"] * k["groups"], base.groups * k["groups"])
        return budget.layer_cost(source, _shape(base, base.hidden, heads,
                                                        base.ffn * k["ffn"]), seq_len)  # fmt: skip

    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) < target else (low, mid)
    return (low + high) / 2


def alpha(source: ModelArch, budget: Budget, scores: dict, dims: Sequence[str], tp: int = 1,
          pp: int = 1, seq_len: int = 2048, eps: float = DEFAULT_ALPHA_EPS) -> dict:  # fmt: skip
    """AlphaPruning turned into per-layer widths: keep ratios from the block alphas (weighted by
    each layer's dense cost), each layer's head count the grid's nearest to its continuous
    ratio, its FFN the grid's nearest to its cost; then FFN steps move, one layer at a time,
    from the layers furthest above their share to close the gap to the budget."""
    bad = sorted(set(dims) - set(ALPHA_DIMS))
    if bad:
        raise UserError(f"--strategy alpha sets per-layer widths ({list(ALPHA_DIMS)}); "
                        f"{bad} are global: use --strategy uniform for them")  # fmt: skip
    alphas = block_alphas(scores)
    if len(alphas) != source.num_layers:
        raise UserError(f"{len(alphas)} ESD alphas for a model of {source.num_layers} layers")
    shapes = layer_shapes(source)
    dense = [budget.layer_cost(source, s, seq_len) for s in shapes]
    ratios = alpha_keep_ratios(alphas, budget.keep, eps, dense)
    grid = make_grid(source, dims, tp, pp)
    wanted = [float(r * c) for r, c in zip(ratios, dense, strict=True)]
    heads, ffn, per_neuron, fixed = [], [], [], []
    for s, want in zip(shapes, wanted, strict=True):
        r = _continuous_ratio(source, budget, dims, s, want, seq_len)
        pair = min(grid.heads, key=lambda p: (
            sum(abs(x - r) for x in grid.ratios(source, s.hidden, p, 1, None)), -p[0], -p[1]))
        base = budget.layer_cost(source, _shape(s, s.hidden, pair, 0), seq_len)
        slope = budget.layer_cost(source, _shape(s, s.hidden, pair, 1), seq_len) - base
        f = min(grid.ffn, key=lambda v: (abs(base + slope * v - want), -v))
        heads.append(pair), ffn.append(f), per_neuron.append(slope), fixed.append(base)
    ffn = _close_gap(ffn, grid.ffn, fixed, per_neuron, wanted, budget.keep * sum(dense))
    total = sum(b + k * f for b, k, f in zip(fixed, per_neuron, ffn, strict=True))
    if not budget.met_by(total / sum(dense)):
        raise UserError(
            f"alpha plan reaches {total / sum(dense):.4f} of the dense cost, not --budget "
            f"{budget} within {TOLERANCE:.0%} at TP={tp}: the valid widths are too coarse for it "
            "(prune more dimensions with --prune, or change the budget)"
        )
    return dict(hidden_size=source.hidden_size, num_layers=source.num_layers,
                ffn_hidden_size=ffn, num_attention_heads=[p[0] for p in heads],
                num_query_groups=[p[1] for p in heads])  # fmt: skip


def _close_gap(ffn: list[int], values: Sequence[int], fixed: list[float], per_neuron: list[float],
               wanted: list[float], target: float) -> list[int]:  # fmt: skip
    """Move one FFN grid step at a time, from the layer furthest above its share when over the
    budget (furthest below when under), while that brings the total closer to ``target``."""
    ffn, index = list(ffn), {v: k for k, v in enumerate(values)}

    def cost(i: int, f: int) -> float:
        return fixed[i] + per_neuron[i] * f

    total = sum(cost(i, f) for i, f in enumerate(ffn))
    for _ in range(len(ffn) * len(values)):
        over = total > target
        movable = [i for i, f in enumerate(ffn)
                   if (index[f] > 0 if over else index[f] < len(values) - 1)]  # fmt: skip
        if not movable:
            break
        excess = [cost(i, ffn[i]) - wanted[i] for i in movable]
        i = movable[int(np.argmax(excess) if over else np.argmin(excess))]
        new_f = values[index[ffn[i]] + (-1 if over else 1)]
        new_total = total - cost(i, ffn[i]) + cost(i, new_f)
        if abs(new_total - target) >= abs(total - target):
            break
        ffn[i], total = new_f, new_total
    return ffn
