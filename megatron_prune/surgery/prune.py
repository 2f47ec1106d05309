"""The whole surgery: depth (with CLAP), attention, FFN and hidden width, SLNP, Post-RMSNorm
absorption. Pure tensor code on whole Megatron tensors; inputs are never modified."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_prune.models.arch import ModelArch
from megatron_prune.surgery.norms import absorb_post_norm, slnp
from megatron_prune.surgery.select import layers_to_drop, top_indices
from megatron_prune.surgery.state import (
    FC2,
    FINAL_NORM,
    POST_ATTN_NORM,
    POST_MLP_NORM,
    PROJ,
    ModelState,
)
from megatron_prune.surgery.target import Target, TargetError
from megatron_prune.surgery.width import HIDDEN_NORMS, assemble_attention, prune_ffn, prune_hidden


@dataclass(frozen=True)
class PruneOptions:
    clap: bool = False
    slnp: bool = False
    absorb_post_norms: bool = False
    channel_score: str = "channel/l1"
    head_score: str = "head/l2"
    neuron_score: str = "neuron/l2"
    layer_score: str = "layer/block_influence"

    def required_scores(self, arch: ModelArch, target: Target) -> list[str]:
        names = []
        if target.hidden_size < arch.hidden_size:
            names.append(self.channel_score)
        if (target.num_attention_heads, target.num_query_groups) != (
            arch.num_attention_heads, arch.num_query_groups
        ) or self.clap:  # fmt: skip
            names.append(self.head_score)
        if target.ffn_hidden_size < arch.ffn_hidden_size:
            names.append(self.neuron_score)
        if target.num_layers < arch.num_layers and target.drop_layers is None:
            names.append(self.layer_score)
        if self.absorb_post_norms:
            names += ["post_norm/attn_inv_rms", "post_norm/mlp_inv_rms"]
        return names


@dataclass
class PruneResult:
    state: dict[str, torch.Tensor]
    arch: ModelArch
    kept_layers: list[int]
    dropped_layers: list[int]
    clap_donors: dict[int, list[int]] = field(default_factory=dict)


def check_scores(scores: dict, arch: ModelArch, target: Target, options: PruneOptions) -> None:
    missing = [n for n in options.required_scores(arch, target) if n not in scores]
    if missing:
        raise TargetError(
            f"the scores lack {missing}: rerun `megatron-prune score` with the metrics that "
            "produce them"
        )
    if options.absorb_post_norms and not arch.post_norms:
        raise TargetError("--absorb-post-norms needs a sandwich-norm model (post-norms)")
    if options.clap and target.num_layers == arch.num_layers:
        raise TargetError("--clap merges attention of dropped layers: the target drops none")


def _attention_picks(state, arch, target, scores, kept_layer, donors, head_score):
    g, p = arch.num_query_groups, arch.num_attention_heads // arch.num_query_groups
    p_new = target.num_attention_heads // target.num_query_groups
    candidates, ranks = [], []
    for src in [kept_layer, *donors]:
        per_group = scores[head_score][src].view(g, p)
        for grp in range(g):
            heads = top_indices(per_group[grp], p_new)
            candidates.append((state.layers[src], grp, heads))
            ranks.append(per_group[grp][heads].double().mean())  # Eq. 5: surviving heads
    chosen = top_indices(torch.stack(ranks), target.num_query_groups)
    return [candidates[i] for i in chosen.tolist()]


def prune_model(
    flat: dict[str, torch.Tensor],
    arch: ModelArch,
    scores: dict[str, torch.Tensor],
    target: Target,
    options: PruneOptions = PruneOptions(),
) -> PruneResult:
    """Apply ``target`` to the whole Megatron state ``flat`` of a model ``arch``."""
    check_scores(scores, arch, target, options)
    state = ModelState.from_flat(flat)
    L = arch.num_layers
    if target.drop_layers is not None:
        dropped = list(target.drop_layers)
    elif target.num_layers < L:
        dropped = layers_to_drop(scores[options.layer_score], target.num_layers)
    else:
        dropped = []
    kept = [i for i in range(L) if i not in dropped]
    donors: dict[int, list[int]] = {i: [] for i in kept}
    if options.clap:  # a dropped layer's groups compete in the nearest kept layer before it
        for d in dropped:
            before = [k for k in kept if k < d]
            if before:
                donors[before[-1]].append(d)

    attention_changes = options.clap or (target.num_attention_heads, target.num_query_groups) != (
        arch.num_attention_heads, arch.num_query_groups
    )  # fmt: skip
    layers = []
    for i in kept:
        layer = state.layers[i]
        if attention_changes:
            picks = _attention_picks(state, arch, target, scores, i, donors[i], options.head_score)
            layer = assemble_attention(layer, picks, arch.num_query_groups, arch.head_dim)
        if target.ffn_hidden_size < arch.ffn_hidden_size:
            keep = top_indices(scores[options.neuron_score][i], target.ffn_hidden_size)
            layer = prune_ffn(layer, keep)
        layers.append(layer)
    pruned = ModelState(layers, dict(state.other))

    if target.hidden_size < arch.hidden_size:
        keep = top_indices(scores[options.channel_score], target.hidden_size)
        before = pruned
        pruned = prune_hidden(pruned, keep)
        if options.slnp:
            _apply_slnp(before, pruned, keep, arch.zero_centered_gamma)

    post_norms = arch.post_norms
    if options.absorb_post_norms:
        for new, i in zip(pruned.layers, kept, strict=True):
            for norm, proj, key in ((POST_ATTN_NORM, PROJ, "attn"), (POST_MLP_NORM, FC2, "mlp")):
                inv = float(scores[f"post_norm/{key}_inv_rms"][i])
                new[proj] = absorb_post_norm(
                    new[proj], new.pop(norm), inv, arch.zero_centered_gamma
                )
        post_norms = False
    new_arch = target.arch(arch, post_norms=post_norms)
    if arch.sliding_window is not None and dropped:  # survivors keep their local/global kind
        local = tuple(arch.is_local_layer(i) for i in kept)
        new_arch = ModelArch.from_dict({**new_arch.to_dict(), "local_layers": local})
    return PruneResult(
        pruned.to_flat(), new_arch, kept, dropped, {k: v for k, v in donors.items() if v}
    )


def _apply_slnp(before: ModelState, after: ModelState, keep: torch.Tensor, zc: bool) -> None:
    """Eq. 6 on every norm that lost channels (in place on ``after``, a fresh object)."""
    after.other[FINAL_NORM] = slnp(before.other[FINAL_NORM], after.other[FINAL_NORM], zc)
    for old, new in zip(before.layers, after.layers, strict=True):
        for name in HIDDEN_NORMS:
            if name in new:
                new[name] = slnp(old[name], new[name], zc)
