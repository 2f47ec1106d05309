"""A whole-model Megatron state dict, viewed per layer, and the QKV index maps surgery needs.

Whole state names are those of an unsharded GPTModel with global layer indices
(``decoder.layers.{i}.<suffix>``); :class:`ModelState` holds the per-layer suffix dicts and the
rest, so removing or reordering layers is list surgery, not string surgery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

QKV = "self_attention.linear_qkv.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
PROJ = "self_attention.linear_proj.weight"
FC1 = "mlp.linear_fc1.weight"
FC2 = "mlp.linear_fc2.weight"
INPUT_NORM = "input_layernorm.weight"
PRE_MLP_NORM = "pre_mlp_layernorm.weight"
POST_ATTN_NORM = "self_attention.linear_proj.post_norm.weight"
POST_MLP_NORM = "mlp.linear_fc2.post_norm.weight"
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"


@dataclass
class ModelState:
    layers: list[dict[str, torch.Tensor]]
    other: dict[str, torch.Tensor]

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor]) -> ModelState:
        layers: dict[int, dict[str, torch.Tensor]] = {}
        other = {}
        for name, t in flat.items():
            m = _LAYER.match(name)
            if m:
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
            else:
                other[name] = t
        return cls([layers[i] for i in sorted(layers)], other)

    def to_flat(self) -> dict[str, torch.Tensor]:
        flat = dict(self.other)
        for i, layer in enumerate(self.layers):
            flat.update({f"decoder.layers.{i}.{k}": v for k, v in layer.items()})
        return flat


def split_qkv(w: torch.Tensor, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """[g (p + 2) d, ...] -> q [g, p, d, ...], k [g, d, ...], v [g, d, ...].

    Example (g=2, p=2, d=1): rows (q0 q1 k0 v0 q2 q3 k1 v1) -> q [[q0, q1], [q2, q3]],
    k [k0, k1], v [v0, v1].
    """
    tail = w.shape[1:]
    per_group = w.shape[0] // groups
    p = per_group // head_dim - 2
    grouped = w.reshape(groups, per_group, *tail)
    q, k, v = grouped.split([p * head_dim, head_dim, head_dim], dim=1)
    return q.reshape(groups, p, head_dim, *tail), k, v


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`split_qkv`."""
    g, p, d = q.shape[:3]
    tail = q.shape[3:]
    return torch.cat([q.reshape(g, p * d, *tail), k, v], dim=1).reshape(g * (p + 2) * d, *tail)
