"""Width pruning of whole Megatron tensors: hidden channels, attention heads and query groups,
FFN neurons. Megatron weights are [out, in].

Hidden channels appear as the columns of the embedding and output layer ([V, h]), every norm's
gamma (QK-norms excepted: they act on head channels), the input columns of QKV and FC1, and the
output rows of the attention projection and FC2.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from megatron_prune.surgery.state import (
    EMBEDDING,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    OUTPUT,
    POST_ATTN_NORM,
    POST_MLP_NORM,
    PRE_MLP_NORM,
    PROJ,
    QKV,
    QKV_BIAS,
    ModelState,
    join_qkv,
    split_qkv,
)

HIDDEN_NORMS = (INPUT_NORM, PRE_MLP_NORM, POST_ATTN_NORM, POST_MLP_NORM)


def prune_layer_hidden(
    layer: dict[str, torch.Tensor], keep: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Keep hidden channels ``keep`` in one layer: its norms, the input columns of QKV and FC1,
    the output rows of the attention projection and FC2."""
    new = dict(layer)
    for name in HIDDEN_NORMS:
        if name in new:
            new[name] = new[name][keep]
    new[QKV] = layer[QKV][:, keep]
    new[FC1] = layer[FC1][:, keep]
    new[PROJ] = layer[PROJ][keep]
    new[FC2] = layer[FC2][keep]
    return new


def prune_other_hidden(
    other: Mapping[str, torch.Tensor], keep: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Keep hidden channels ``keep`` in whichever of the embedding, output layer ([V, h], or a
    block of their rows) and final norm ``other`` holds."""
    new = dict(other)
    for name in (EMBEDDING, OUTPUT):
        if name in new:
            new[name] = new[name][:, keep]  # [V, h]
    if FINAL_NORM in new:
        new[FINAL_NORM] = new[FINAL_NORM][keep]
    return new


def prune_hidden(state: ModelState, keep: torch.Tensor) -> ModelState:
    """Keep hidden channels ``keep`` everywhere they appear."""
    layers = [prune_layer_hidden(layer, keep) for layer in state.layers]
    return ModelState(layers, prune_other_hidden(state.other, keep))


class Pick(NamedTuple):
    """One query group a pruned layer keeps: the layer it comes from (whole tensors), that
    layer's group count, the group's index there, and the heads kept inside it."""

    layer: dict[str, torch.Tensor]
    num_groups: int
    group: int
    heads: torch.Tensor


def assemble_attention(
    base: dict[str, torch.Tensor], picks: list[Pick], head_dim: int
) -> dict[str, torch.Tensor]:
    """``base`` with its attention rebuilt from ``picks``, one per kept query group. Each group
    brings its K and V rows, the Q rows of its kept heads and the attention-projection columns of
    those heads. With every pick from ``base`` this is plain head / group pruning; CLAP also
    picks groups from a dropped layer.
    """
    new = dict(base)
    qs, ks, vs, cols, biases = [], [], [], [], []
    for layer, num_groups, g, heads in picks:
        q, k, v = split_qkv(layer[QKV], num_groups, head_dim)  # q [g, p, d, h]
        qs.append(q[g][heads])
        ks.append(k[g])
        vs.append(v[g])
        if QKV_BIAS in layer:
            qb, kb, vb = split_qkv(layer[QKV_BIAS], num_groups, head_dim)
            biases.append((qb[g][heads], kb[g], vb[g]))
        h = layer[PROJ].shape[0]
        proj = layer[PROJ].view(h, num_groups, -1, head_dim)  # [h, g, p, d]
        cols.append(proj[:, g, heads].reshape(h, -1))
    new[QKV] = join_qkv(torch.stack(qs), torch.stack(ks), torch.stack(vs))
    if biases:
        qb, kb, vb = (torch.stack(parts) for parts in zip(*biases, strict=True))
        new[QKV_BIAS] = join_qkv(qb, kb, vb)
    new[PROJ] = torch.cat(cols, dim=1)
    return new


def prune_ffn(layer: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep FFN neurons ``keep``: the same rows of both FC1 halves, the same FC2 columns."""
    new = dict(layer)
    gate, up = layer[FC1].chunk(2)
    new[FC1] = torch.cat([gate[keep], up[keep]])
    new[FC2] = layer[FC2][:, keep]
    return new
