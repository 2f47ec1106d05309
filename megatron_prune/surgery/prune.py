"""The whole surgery: depth (with CLAP), attention, FFN and hidden width, SLNP, Post-RMSNorm
absorption. Pure tensor code on whole Megatron tensors; inputs are never modified."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from megatron_prune.models.arch import LayerWidths, ModelArch
from megatron_prune.plan.target import Target, TargetError
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
from megatron_prune.surgery.width import (
    HIDDEN_NORMS,
    Pick,
    assemble_attention,
    prune_ffn,
    prune_layer_hidden,
    prune_other_hidden,
)


@dataclass(frozen=True)
class PruneOptions:
    clap: bool = False
    slnp: bool = False
    absorb_post_norms: bool = False
    # remove the post-norms without folding them anywhere: the paper's "dropped" baseline
    # (Table 4), which absorption is measured against
    drop_post_norms: bool = False
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
    for flag, wanted in (("--absorb-post-norms", options.absorb_post_norms),
                         ("--drop-post-norms", options.drop_post_norms)):  # fmt: skip
        if wanted and not arch.post_norms:
            raise TargetError(f"{flag} needs a sandwich-norm model (post-norms)")
    if options.absorb_post_norms and options.drop_post_norms:
        raise TargetError("--absorb-post-norms and --drop-post-norms exclude each other: "
                          "fold the post-norms or remove them, not both")  # fmt: skip
    if options.clap and target.num_layers == arch.num_layers:
        raise TargetError("--clap merges attention of dropped layers: the target drops none")


class GroupPick(NamedTuple):
    """One query group a pruned layer keeps, chosen from scores alone: the source layer it comes
    from, that layer's group count, the group's index there and the heads kept inside it."""

    source: int
    num_groups: int
    group: int
    heads: torch.Tensor


def _attention_picks(
    arch: ModelArch, new: LayerWidths, scores: torch.Tensor, sources: list[int]
) -> list[GroupPick]:
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
            candidates.append(GroupPick(src, g, grp, heads))
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


@dataclass(frozen=True)
class LayerPlan:
    """What output layer k is made of: its source layer, the query groups it keeps (None: its
    attention is left as it is) and the FFN neurons it keeps (None: all)."""

    source: int
    groups: list[GroupPick] | None
    ffn_keep: torch.Tensor | None
    inv_rms: tuple[float, float] | None  # (attention, MLP) post-norm constants when absorbing

    @property
    def sources(self) -> list[int]:
        """Every source layer whose tensors this layer needs (CLAP donors included)."""
        donors = {p.source for p in self.groups or []} - {self.source}
        return [self.source, *sorted(donors)]


@dataclass(frozen=True)
class SurgeryPlan:
    """Every choice the surgery makes, computed from scores and shapes alone (no weights): small
    enough to compute once and hand to every rank, which then prunes its own layers."""

    source_arch: ModelArch
    arch: ModelArch
    kept: list[int]
    dropped: list[int]
    donors: dict[int, list[int]]
    layers: list[LayerPlan]
    hidden_keep: torch.Tensor | None
    slnp: bool


def plan_surgery(
    arch: ModelArch,
    scores: dict[str, torch.Tensor],
    target: Target,
    options: PruneOptions = PruneOptions(),
) -> SurgeryPlan:
    """Decide what ``target`` keeps of a model ``arch``: layers, query groups and heads, FFN
    neurons, hidden channels."""
    check_scores(scores, arch, target, options)
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
        src, new = arch.widths(i), shape.widths(k)
        groups = None
        if options.clap or (new.num_attention_heads, new.num_query_groups) != (
            src.num_attention_heads, src.num_query_groups
        ):  # fmt: skip
            groups = _attention_picks(arch, new, scores[options.head_score], [i, *donors[i]])
        ffn_keep = None
        if new.ffn_hidden_size < src.ffn_hidden_size:
            ffn_keep = top_indices(scores[options.neuron_score][i], new.ffn_hidden_size)
        inv_rms = None
        if options.absorb_post_norms:
            inv_rms = (float(scores["post_norm/attn_inv_rms"][i]),
                       float(scores["post_norm/mlp_inv_rms"][i]))  # fmt: skip
        layers.append(LayerPlan(i, groups, ffn_keep, inv_rms))

    hidden_keep = None
    if target.hidden_size < arch.hidden_size:
        hidden_keep = top_indices(scores[options.channel_score], target.hidden_size)
    post_norms = arch.post_norms and not (options.absorb_post_norms or options.drop_post_norms)
    new_arch = target.arch(arch, kept, post_norms=post_norms)
    if arch.sliding_window is not None and dropped:  # survivors keep their local/global kind
        local = tuple(arch.is_local_layer(i) for i in kept)
        new_arch = ModelArch.from_dict({**new_arch.to_dict(), "local_layers": local})
    return SurgeryPlan(
        arch, new_arch, kept, dropped, {k: v for k, v in donors.items() if v}, layers,
        hidden_keep, options.slnp and hidden_keep is not None,
    )  # fmt: skip


def prune_layer(
    plan: SurgeryPlan, k: int, sources: Mapping[int, dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Output layer ``k`` from the whole tensors of its source layers (``plan.layers[k].sources``,
    keyed by source layer index; layer-local names such as ``mlp.linear_fc1.weight``). Inputs
    are not modified."""
    lp = plan.layers[k]
    original = sources[lp.source]
    layer = original
    if lp.groups is not None:
        picks = [Pick(sources[p.source], p.num_groups, p.group, p.heads) for p in lp.groups]
        layer = assemble_attention(layer, picks, plan.source_arch.head_dim)
    if lp.ffn_keep is not None:
        layer = prune_ffn(layer, lp.ffn_keep)
    if plan.hidden_keep is not None:
        layer = prune_layer_hidden(layer, plan.hidden_keep)
        if plan.slnp:
            zc = plan.source_arch.zero_centered_gamma
            for name in HIDDEN_NORMS:
                if name in layer:
                    layer[name] = slnp(original[name], layer[name], zc)
    if lp.inv_rms is not None:
        layer = dict(layer)
        zc = plan.source_arch.zero_centered_gamma
        for (norm, proj), inv in zip(((POST_ATTN_NORM, PROJ), (POST_MLP_NORM, FC2)), lp.inv_rms,
                                     strict=True):  # fmt: skip
            layer[proj] = absorb_post_norm(layer[proj], layer.pop(norm), inv, zc)
    elif plan.source_arch.post_norms and not plan.arch.post_norms:  # --drop-post-norms
        layer = {k: v for k, v in layer.items() if k not in (POST_ATTN_NORM, POST_MLP_NORM)}
    return layer


def prune_other(plan: SurgeryPlan, other: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors outside the layers (embedding, output layer, final norm), whichever of them
    ``other`` holds. The embedding and output layer may be any block of their vocabulary rows
    (a tensor-parallel rank's share): hidden pruning selects columns."""
    if plan.hidden_keep is None:
        return dict(other)
    pruned = prune_other_hidden(other, plan.hidden_keep)
    if plan.slnp and FINAL_NORM in other:
        zc = plan.source_arch.zero_centered_gamma
        pruned[FINAL_NORM] = slnp(other[FINAL_NORM], pruned[FINAL_NORM], zc)
    return pruned


def prune_model(
    flat: dict[str, torch.Tensor],
    arch: ModelArch,
    scores: dict[str, torch.Tensor],
    target: Target,
    options: PruneOptions = PruneOptions(),
) -> PruneResult:
    """Apply ``target`` to the whole Megatron state ``flat`` of a model ``arch`` (one process,
    whole tensors; ``prune`` runs the same per-layer functions rank by rank on the shards)."""
    plan = plan_surgery(arch, scores, target, options)
    state = ModelState.from_flat(flat)
    layers = [
        prune_layer(plan, k, {i: state.layers[i] for i in lp.sources})
        for k, lp in enumerate(plan.layers)
    ]
    pruned = ModelState(layers, prune_other(plan, state.other))
    return PruneResult(pruned.to_flat(), plan.arch, plan.kept, plan.dropped, plan.donors)
