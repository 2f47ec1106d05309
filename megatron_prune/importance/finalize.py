"""From world-wide sums to scores, all in global (unsharded) index space.

Score names (the same at every layout) and what they are, with T the calibration tokens:
  channel/l1          [h]     Eq. 1: sum over norms and tokens of |RMSNorm(x)_k|
  channel/minitron    [h]     sum over norms of L2 over samples of mean_t |RMSNorm(x)_k|
  head/l2             [L, n]  Eq. 2: L2 norm of each head's attention output over tokens
  head/minitron       [L, n]  L2 over samples of mean_t ||head output||
  head/wanda          [L, n]  sum over the head's columns j of ||X_j|| * sum_i |W_proj[i, j]|
  head/flap           [L, n]  sum over the head's columns of Var(X_j) * ||W_proj[:, j]||^2
  group/mean_head     [L, g]  Eq. 5: mean head/l2 of the group's heads
  group/l2            [L, g]  L2 norm of the whole group's attention output
  neuron/l2           [L, f]  Eq. 3: L2 norm of each FFN activation (input of linear_fc2)
  neuron/minitron, neuron/wanda, neuron/flap  [L, f]  as for heads, per neuron
  input_norm/qkv, input_norm/fc1 [L, h], input_norm/proj [L, n*d], input_norm/fc2 [L, f]
                              ||X_j|| over tokens of each input column of the block's linear
                              layers (unstructured Wanda, ``sparsify``)
  layer/block_influence [L]   Eq. 4: 1 - mean cosine(layer input, layer output)
  post_norm/attn_inv_rms, post_norm/mlp_inv_rms [L]  mean 1/sqrt(mean(x^2)+eps) of the
                              post-norm's input (Eq. 8), for Post-RMSNorm absorption
"""

from __future__ import annotations

import torch

from megatron_prune.importance.hooks import NORM_KINDS
from megatron_prune.models.arch import ModelArch


def finalize(
    sums: dict[str, torch.Tensor], arch: ModelArch, tokens: int
) -> dict[str, torch.Tensor]:
    L, n, g, d = arch.num_layers, arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    out: dict[str, torch.Tensor] = {}
    if "channel.abs_sum" in sums:
        out["channel/l1"] = sums["channel.abs_sum"]
    if "proj_in.sq_sum" in sums:
        per_head_sq = sums["proj_in.sq_sum"].view(L, n, d).sum(-1)
        out["head/l2"] = per_head_sq.sqrt()
        out["group/mean_head"] = out["head/l2"].view(L, g, n // g).mean(-1)
        out["group/l2"] = per_head_sq.view(L, g, n // g).sum(-1).sqrt()
    if "fc2_in.sq_sum" in sums:
        out["neuron/l2"] = sums["fc2_in.sq_sum"].sqrt()
    if "proj_w.abs_colsum" in sums:
        act = sums["proj_in.sq_sum"].sqrt()
        out["head/wanda"] = (act * sums["proj_w.abs_colsum"]).view(L, n, d).sum(-1)
        out["neuron/wanda"] = sums["fc2_in.sq_sum"].sqrt() * sums["fc2_w.abs_colsum"]
    if "qkv_in.sq_sum" in sums:  # wanda: every block linear's input column norms
        for key in ("qkv", "fc1", "proj", "fc2"):
            out[f"input_norm/{key}"] = sums[f"{key}_in.sq_sum"].sqrt()
    if "proj_w.sq_colsum" in sums:
        for key, name in (("proj", "head"), ("fc2", "neuron")):
            mean = sums[f"{key}_in.sum"] / tokens
            var = (sums[f"{key}_in.sq_sum"] / tokens - mean.pow(2)).clamp_min(0)
            score = var * sums[f"{key}_w.sq_colsum"]
            out[f"{name}/flap"] = score.view(L, n, d).sum(-1) if name == "head" else score
    if "layer.cos_sum" in sums:
        out["layer/block_influence"] = 1 - sums["layer.cos_sum"] / tokens
    for kind in ("attn", "mlp"):
        if f"post_{kind}.inv_rms_sum" in sums:
            out[f"post_norm/{kind}_inv_rms"] = sums[f"post_{kind}.inv_rms_sum"] / tokens
    if "minitron.head" in sums:
        kinds = [k for k in (*NORM_KINDS, "final") if f"minitron.{k}" in sums]
        out["channel/minitron"] = sum(sums[f"minitron.{k}"].sqrt().sum(0) for k in kinds)
        out["head/minitron"] = sums["minitron.head"].sqrt()
        out["neuron/minitron"] = sums["minitron.neuron"].sqrt()
    return {k: v.float() for k, v in out.items()}
