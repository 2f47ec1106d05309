"""The whole surgery: depth (with CLAP), attention, FFN and hidden width, SLNP, Post-RMSNorm
absorption. Pure tensor code on whole Megatron tensors; inputs are never modified."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_prune.models.arch import LayerWidths, ModelArch
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
from megatron_prune.surgery.width import (
    HIDDEN_NORMS,
    Pick,
    assemble_attention,
    prune_ffn,
    prune_hidden,
)


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
        if (
            target.changes("num_attention_heads", arch)
            or target.changes("num_query_groups", arch)
            or self.clap
        ):
            names.append(self.head_score)
        if target.changes("ffn_hidden_size", arch):
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


def _attention_picks(
    state: ModelState,
    arch: ModelArch,
    new: LayerWidths,
    scores: torch.Tensor,
    sources: list[int],
) -> list[Pick]:
    """The query groups layer ``sources[0]`` keeps (with CLAP, ``sources[1:]`` are the dropped
    layers whose groups compete): inside each candidate group its best heads, then the groups
    with the best mean surviving-head score (Eq. 5)."""
    p_new = new.num_attention_heads // new.num_query_groups
    candidates, ranks = [], []
    for src in sources:
        g = arch.widths(src).num_query_groups
        per_group = scores[src].view(g, -1)
        for grp in range(g):
            heads = top_indices(per_group[grp], p_new)
            candidates.append(Pick(state.layers[src], g, grp, heads))
            ranks.append(per_group[grp][heads].double().mean())
    chosen = top_indices(torch.stack(ranks), new.num_query_groups)
    return [candidates[i] for i in chosen.tolist()]


def _check_fits(arch: ModelArch, new_arch: ModelArch, kept: list[int], donors: dict) -> None:
    """Each kept layer's target widths against what its source layer (and CLAP donors) hold.
    Validation already checked them against the widest source layer; this names the layer when
    a heterogeneous source is narrower."""
    for k, i in enumerate(kept):
        problems = []
        src, new = arch.widths(i), new_arch.widths(k)
        groups = sum(arch.widths(j).num_query_groups for j in [i, *donors[i]])
        p_src = min(
            arch.widths(j).num_attention_heads // arch.widths(j).num_query_groups
            for j in [i, *donors[i]]
        )
        if new.ffn_hidden_size > src.ffn_hidden_size:
            problems.append(f"ffn_hidden_size={new.ffn_hidden_size} > {src.ffn_hidden_size}")
        if new.num_query_groups > groups:
            problems.append(f"num_query_groups={new.num_query_groups} > {groups}")
        if new.num_attention_heads // new.num_query_groups > p_src:
            problems.append(f"heads per group {new.num_attention_heads // new.num_query_groups} "
                            f"> {p_src}")  # fmt: skip
        if problems:
            raise TargetError(
                f"kept layer {k} (source layer {i}) is narrower than the target: "
                + "; ".join(problems)
            )


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
    shape = target.arch(arch, kept)  # the pruned widths, layer by layer
    _check_fits(arch, shape, kept, donors)

    layers = []
    for k, i in enumerate(kept):
        layer, src, new = state.layers[i], arch.widths(i), shape.widths(k)
        if options.clap or (new.num_attention_heads, new.num_query_groups) != (
            src.num_attention_heads, src.num_query_groups
        ):  # fmt: skip
            scores_h = scores[options.head_score]
            picks = _attention_picks(state, arch, new, scores_h, [i, *donors[i]])
            layer = assemble_attention(layer, picks, arch.head_dim)
        if new.ffn_hidden_size < src.ffn_hidden_size:
            keep = top_indices(scores[options.neuron_score][i], new.ffn_hidden_size)
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
    new_arch = target.arch(arch, kept, post_norms=post_norms)
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
