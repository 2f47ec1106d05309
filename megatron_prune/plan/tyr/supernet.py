"""The supernet: every layer's locally pruned variants, on disk, loaded on demand.

Folder layout (``PLAN.tyr/supernet/``)::

    layer{i}.safetensors           the dense proj / fc2 weights, their input Grams (fp64) and
                                   the greedy OBS removal orders (heads, neurons)
    layer{i}.attn.{n}.safetensors  linear_proj with n query heads kept (refit), dense shape
    layer{i}.ffn.{f}.safetensors   linear_fc2 with f neurons kept (refit), dense shape

A variant keeps the dense shape with the removed input columns zeroed: the layer computes what
the structurally pruned layer computes (a removed head or neuron reaches the output only
through those columns), so one model at the dense shape evaluates every candidate by swapping
two weights per layer. Variants are written the first time they are asked for and kept in a
small in-memory cache.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_prune.checkpoint.atomic import replace_atomic
from megatron_prune.plan.tyr.local_pruner import kept_columns, prune_columns, removal_order

KINDS = ("attn", "ffn")
LOCAL_PRUNERS = ("obs", "scores")


def score_order(scores: torch.Tensor, balance: int = 1) -> list[int]:
    """The removal order under which every prefix leaves what ``prune`` keeps by ``scores`` at
    that width: its ``top_indices`` inside each of ``balance`` equal blocks (query groups),
    removed one unit per block per round, lowest score first."""
    per_block = scores.numel() // balance
    ranked = []  # per block: units from best to worst, as top_indices ranks them
    for b in range(balance):
        block = scores[b * per_block:(b + 1) * per_block]
        best_first = torch.argsort(block.double(), descending=True, stable=True)  # as top_indices
        ranked.append([b * per_block + int(u) for u in best_first])
    return [ranked[b][per_block - 1 - r] for r in range(per_block) for b in range(balance)]


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    data = {k: v.contiguous() for k, v in tensors.items()}
    replace_atomic(path, lambda tmp: save_file(data, str(tmp)))


class Supernet:
    """Variants of the layers of a model with ``heads`` query heads in ``groups`` groups of
    ``head_dim`` and an FFN of ``ffn`` neurons."""

    def __init__(self, folder: Path, *, heads: int, groups: int, head_dim: int, ffn: int,
                 refit: bool = True, cache: int = 64,
                 scores: dict[str, torch.Tensor] | None = None,
                 write: bool = True) -> None:  # fmt: skip
        """``scores`` (``head``: [L, n], ``neuron``: [L, f]): choose the units as ``prune`` does
        from them, instead of by OBS (the variants are then ``prune``'s layers, refit aside).
        ``write``: store the variants this process builds (one writer per layer: the other
        ranks that need the same variant build it in memory)."""
        self.scores = scores
        self.write = write
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.heads, self.groups, self.head_dim, self.ffn = heads, groups, head_dim, ffn
        self.refit = refit
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._limit = cache
        self._layers: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def _layer_file(self, i: int) -> Path:
        return self.folder / f"layer{i}.safetensors"

    def has_layer(self, i: int) -> bool:
        return self._layer_file(i).is_file()

    def add_layer(self, i: int, proj: torch.Tensor, fc2: torch.Tensor, proj_gram: torch.Tensor,
                  fc2_gram: torch.Tensor, *, min_heads: int, min_ffn: int) -> None:  # fmt: skip
        """Store layer ``i``'s dense weights and statistics with its removal orders, down to
        ``min_heads`` heads and ``min_ffn`` neurons (the narrowest variants the search uses)."""
        if self.scores is not None:
            attn = score_order(self.scores["head"][i], self.groups)[: self.heads - min_heads]
            ffn = score_order(self.scores["neuron"][i])[: self.ffn - min_ffn]
        else:
            attn = removal_order(proj, proj_gram, self.head_dim, balance=self.groups,
                                 count=self.heads - min_heads)  # fmt: skip
            ffn = removal_order(fc2, fc2_gram, 1, count=self.ffn - min_ffn)
        _save(self._layer_file(i), {
            "proj": proj.detach().cpu(), "fc2": fc2.detach().cpu(),
            "proj_gram": proj_gram.double().cpu(), "fc2_gram": fc2_gram.double().cpu(),
            "attn_order": torch.tensor(attn, dtype=torch.long),
            "ffn_order": torch.tensor(ffn, dtype=torch.long),
        })  # fmt: skip
        self._layers.pop(i, None)

    def _layer(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._layers:
            self._layers[i] = load_file(str(self._layer_file(i)))
            while len(self._layers) > 2:  # Grams are the large part: keep few in memory
                self._layers.popitem(last=False)
        return self._layers[i]

    def weight(self, i: int, kind: str, width: int) -> torch.Tensor:
        """Layer ``i``'s ``linear_proj`` (``attn``: ``width`` heads) or ``linear_fc2`` (``ffn``:
        ``width`` neurons) variant, dense shape."""
        key = (i, kind, width)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self.folder / f"layer{i}.{kind}.{width}.safetensors"
        if path.is_file():
            w = load_file(str(path))["weight"]
        else:
            w = self._build(i, kind, width)
            if self.write:
                _save(path, {"weight": w})
        self._cache[key] = w
        while len(self._cache) > self._limit:
            self._cache.popitem(last=False)
        return w

    def _build(self, i: int, kind: str, width: int) -> torch.Tensor:
        layer = self._layer(i)
        if kind == "attn":
            weight, gram, order = layer["proj"], layer["proj_gram"], layer["attn_order"]
            units, unit = self.heads, self.head_dim
        else:
            weight, gram, order = layer["fc2"], layer["fc2_gram"], layer["ffn_order"]
            units, unit = self.ffn, 1
        removed = units - width
        if removed > order.numel():
            raise ValueError(f"layer {i} {kind} width {width}: the supernet stops at "
                             f"{units - order.numel()}")  # fmt: skip
        keep = kept_columns(order.tolist(), removed, units, unit)
        return prune_columns(weight, gram, keep, refit=self.refit)
