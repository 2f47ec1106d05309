"""Unstructured sparsity (pure tensors): magnitude and Wanda masks on a block's four linear
layers, at per-layer ratios (uniform, or AlphaPruning's from the layers' ESD alphas).

This is AlphaPruning's own setting (its paper allocates unstructured sparsity), kept for
fidelity and comparison: the masked model has the dense shape with zeros in it, so it is no
faster without sparse kernels, and ``sparsify`` claims no speed.

* **magnitude**: within each matrix, zero the ``round(s * numel)`` weights of least ``|W|``.
* **wanda** (Sun et al. 2023): within each output row, zero the ``round(s * in)`` weights of
  least ``|W_ij| * ||X_j||``, with ``||X_j||`` the L2 norm over calibration tokens of input
  column ``j`` (``score --metrics wanda`` writes them as ``input_norm/*``).

Ties are broken by position (a stable sort), so the masks are deterministic; the masks are made
on whole (unsharded) tensors, so the result is the same at every layout.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch
from megatron_prune.surgery.state import FC1, FC2, PROJ, QKV

METHODS = ("magnitude", "wanda")
ALLOCATIONS = ("uniform", "alpha")
# the block's linear layers, keyed as the ``input_norm/<key>`` scores name their inputs
LINEARS = {"qkv": QKV, "proj": PROJ, "fc1": FC1, "fc2": FC2}


def _zero_smallest(weight: torch.Tensor, metric: torch.Tensor, count: int) -> torch.Tensor:
    """``weight`` with the ``count`` entries of least ``metric`` along the last dim zeroed."""
    if count <= 0:
        return weight.clone()
    order = torch.argsort(metric, dim=-1, stable=True)[..., :count]
    return weight.scatter(-1, order, torch.zeros_like(order, dtype=weight.dtype))


def magnitude_sparsify(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``round(sparsity * numel)`` entries of least magnitude in the whole matrix."""
    count = round(sparsity * weight.numel())
    flat = weight.reshape(1, -1)
    return _zero_smallest(flat, flat.abs().float(), count).view_as(weight)


def wanda_sparsify(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero, in each output row, the ``round(sparsity * columns)`` entries of least
    ``|W_ij| * ||X_j||``."""
    if input_norm.shape != (weight.shape[1],):
        shapes = f"{tuple(input_norm.shape)} for a {tuple(weight.shape)} matrix"
        raise ValueError(f"input norms {shapes}")
    metric = weight.abs().float() * input_norm.float().unsqueeze(0)
    return _zero_smallest(weight, metric, round(sparsity * weight.shape[1]))


def sparsify_layer(tensors: Mapping[str, torch.Tensor], sparsity: float, method: str,
                   input_norms: Mapping[str, torch.Tensor] | None = None,
                   ) -> dict[str, torch.Tensor]:  # fmt: skip
    """One block's tensors (layer-local names) with its four linear layers masked at
    ``sparsity``; every other tensor (norms, biases) unchanged. ``input_norms[key]`` (keys of
    :data:`LINEARS`) are this layer's input column norms, which ``wanda`` needs."""
    out = dict(tensors)
    for key, name in LINEARS.items():
        if method == "magnitude":
            out[name] = magnitude_sparsify(tensors[name], sparsity)
        else:
            out[name] = wanda_sparsify(tensors[name], input_norms[key], sparsity)
    return out


def layer_sparsities(num_layers: int, sparsity: float, allocation: str,
                     alphas: Sequence[float] | None = None, eps: float = 0.3,
                     weights: Sequence[float] | None = None) -> list[float]:  # fmt: skip
    """Per-layer sparsities whose ``weights``-weighted mean is ``sparsity``: the same for every
    layer (``uniform``), or AlphaPruning's eps-spread shares from the block alphas."""
    if not 0 <= sparsity < 1:
        raise UserError(f"--sparsity {sparsity}: must be in [0, 1)")
    if allocation == "uniform":
        return [float(sparsity)] * num_layers
    from megatron_prune.plan.strategies import alpha_keep_ratios

    keep = alpha_keep_ratios(alphas, 1 - sparsity, eps, weights)
    return [float(s) for s in np.clip(1 - keep, 0.0, 1.0)]


@dataclass(frozen=True)
class SparsityPlan:
    """What ``sparsify`` does: per-layer sparsities (source layer order), the method, and for
    Wanda each linear layer's input column norms (``input_norm/<key>`` scores, [L, columns])."""

    method: str
    allocation: str
    sparsities: list[float]
    input_norms: dict[str, torch.Tensor] | None = None

    def record(self) -> dict:
        return {"method": self.method, "allocation": self.allocation,
                "layer_sparsities": [round(s, 6) for s in self.sparsities]}  # fmt: skip


def plan_sparsity(arch: ModelArch, scores: Mapping[str, torch.Tensor], sparsity: float,
                  method: str, allocation: str, eps: float,
                  scores_label: object = None) -> SparsityPlan:  # fmt: skip
    """The plan for ``arch`` from its score table: per-layer sparsities (their mean, weighted by
    each layer's matrix weights, is ``sparsity``) and, for ``wanda``, the input norms; a score
    table without what the method or allocation needs is refused (``scores_label`` names it)."""
    from megatron_prune.plan.cost import layer_shapes, matmul_params
    from megatron_prune.plan.strategies import block_alphas

    norms = None
    if method == "wanda":
        missing = [f"input_norm/{k}" for k in LINEARS if f"input_norm/{k}" not in scores]
        if missing:
            raise UserError(f"--scores {scores_label} has no {', '.join(missing)}: score again "
                            "with `--metrics wanda` (it adds the input norms unstructured Wanda "
                            "needs)")  # fmt: skip
        norms = {k: scores[f"input_norm/{k}"] for k in LINEARS}
    alphas = block_alphas(scores) if allocation == "alpha" else None
    weights = [matmul_params(arch, s) for s in layer_shapes(arch)]  # the masked matrices
    sparsities = layer_sparsities(arch.num_layers, sparsity, allocation, alphas, eps, weights)
    achieved = float(np.average(sparsities, weights=weights))
    if abs(achieved - sparsity) > 1e-6:  # the mapping guarantees the mean; a miss is a bug
        raise RuntimeError(f"per-layer sparsities average {achieved}, not {sparsity}")
    return SparsityPlan(method, allocation, sparsities, norms)
