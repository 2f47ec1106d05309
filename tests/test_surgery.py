"""Pruning surgery as pure functions (one process): identity, index maps, CLAP, SLNP,
absorption, target validation. Model-level checks (logits, layouts) are in test_prune.py."""

import pytest
import torch

from megatron_prune.models.norm import RMSNorm
from megatron_prune.plan.target import TargetError, load_target
from megatron_prune.surgery.norms import absorb_post_norm, gamma_of, slnp
from megatron_prune.surgery.prune import PruneOptions, prune_model
from megatron_prune.surgery.state import ModelState, split_qkv
from tests.tiny_models import random_scores, whole_state


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_keep_everything_is_the_identity(family):
    state, arch = whole_state(family)
    target = load_target({}, arch)
    out = prune_model(state, arch, random_scores(arch), target, PruneOptions(slnp=True))
    assert out.arch == arch and sorted(out.state) == sorted(state)
    assert all(torch.equal(out.state[k], state[k]) for k in state)


def test_width_pruning_keeps_the_top_scored_units():
    state, arch = whole_state("qwen2")
    scores = random_scores(arch, seed=1)
    target = load_target({"hidden_size": 48, "ffn_hidden_size": 96, "num_attention_heads": 2,
                          "num_query_groups": 2}, arch)  # fmt: skip
    out = prune_model(state, arch, scores, target).state
    ch = scores["channel/l1"].argsort(descending=True)[:48].sort().values
    assert torch.equal(
        out["decoder.final_layernorm.weight"], state["decoder.final_layernorm.weight"][ch]
    )
    assert torch.equal(
        out["embedding.word_embeddings.weight"], state["embedding.word_embeddings.weight"][:, ch]
    )
    # layer 0, group 1: the better of its two heads (qwen2 tiny: n=4, g=2, p=2, d=16)
    d = arch.head_dim
    q, k, v = split_qkv(state["decoder.layers.0.self_attention.linear_qkv.weight"], 2, d)
    best = int(scores["head/l2"][0].view(2, 2)[1].argmax())
    q2, k2, v2 = split_qkv(out["decoder.layers.0.self_attention.linear_qkv.weight"], 2, d)
    assert torch.equal(q2[1, 0], q[1, best][:, ch]) and torch.equal(k2[1], k[1][:, ch])
    neurons = scores["neuron/l2"][0].argsort(descending=True)[:96].sort().values
    fc2 = state["decoder.layers.0.mlp.linear_fc2.weight"]
    assert torch.equal(out["decoder.layers.0.mlp.linear_fc2.weight"], fc2[ch][:, neurons])


def test_depth_pruning_drops_the_lowest_block_influence():
    state, arch = whole_state("qwen2")
    scores = random_scores(arch, seed=2)
    scores["layer/block_influence"] = torch.tensor([0.9, 0.1, 0.5, 0.3])
    out = prune_model(state, arch, scores, load_target({"num_layers": 2}, arch))
    assert out.dropped_layers == [1, 3] and out.kept_layers == [0, 2]
    layers = ModelState.from_flat(out.state).layers
    assert torch.equal(
        layers[1]["mlp.linear_fc2.weight"], state["decoder.layers.2.mlp.linear_fc2.weight"]
    )


def test_clap_moves_whole_groups_from_the_dropped_layer():
    state, arch = whole_state("qwen2")  # n=4 heads, g=2 groups, p=2 heads per group
    scores = random_scores(arch)
    # layer 2 is dropped; its group 1 outranks layer 1's group 0 (Eq. 5 over surviving heads)
    scores["head/l2"] = torch.tensor([[1.0, 1, 1, 1], [0.1, 0.2, 0.9, 0.8],
                                      [0.5, 0.5, 0.95, 0.7], [1, 1, 1, 1]])  # fmt: skip
    target = load_target(
        {"drop_layers": [2], "num_attention_heads": 2, "num_query_groups": 2}, arch
    )
    out = prune_model(state, arch, scores, target, PruneOptions(clap=True))
    assert out.clap_donors == {1: [2]}
    d, new = arch.head_dim, ModelState.from_flat(out.state).layers[1]
    q1, k1, v1 = split_qkv(state["decoder.layers.1.self_attention.linear_qkv.weight"], 2, d)
    q2, k2, v2 = split_qkv(state["decoder.layers.2.self_attention.linear_qkv.weight"], 2, d)
    q, k, v = split_qkv(new["self_attention.linear_qkv.weight"], 2, d)
    # kept: layer 1 group 1 (head 0 of it, score 0.9) and layer 2 group 1 (head 0, 0.95)
    assert torch.equal(q[0, 0], q1[1, 0]) and torch.equal(k[0], k1[1]) and torch.equal(v[0], v1[1])
    assert torch.equal(q[1, 0], q2[1, 0]) and torch.equal(k[1], k2[1]) and torch.equal(v[1], v2[1])
    h = arch.hidden_size
    p1 = state["decoder.layers.1.self_attention.linear_proj.weight"].view(h, 2, 2, d)
    p2 = state["decoder.layers.2.self_attention.linear_proj.weight"].view(h, 2, 2, d)
    proj = new["self_attention.linear_proj.weight"].view(h, 2, 1, d)
    assert torch.equal(proj[:, 0, 0], p1[:, 1, 0]) and torch.equal(proj[:, 1, 0], p2[:, 1, 0])
    bias = new["self_attention.linear_qkv.bias"]
    _, kb2, _ = split_qkv(state["decoder.layers.2.self_attention.linear_qkv.bias"], 2, d)
    assert torch.equal(split_qkv(bias, 2, d)[1][1], kb2[1])


@pytest.mark.parametrize("zero_centered", [False, True])
def test_slnp_preserves_each_gammas_l2_norm(zero_centered):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, generator=g)
    pruned = slnp(w, w[:40], zero_centered)
    before = gamma_of(w, zero_centered).norm()
    assert torch.allclose(gamma_of(pruned, zero_centered).norm(), before, rtol=1e-6)
    ratio = gamma_of(pruned, zero_centered) / gamma_of(w[:40], zero_centered)
    assert torch.allclose(ratio, ratio[0].expand(40), rtol=1e-5)  # one scalar per norm


def test_slnp_in_the_pipeline_applies_to_every_pruned_norm():
    state, arch = whole_state("gemma3")
    out = prune_model(state, arch, random_scores(arch), load_target({"hidden_size": 40}, arch),
                      PruneOptions(slnp=True)).state  # fmt: skip
    for name in [k for k in state if k.endswith("layernorm.weight") or "post_norm" in k]:
        if "q_layernorm" in name or "k_layernorm" in name:
            assert torch.equal(out[name], state[name])  # head-dim norms are not pruned
            continue
        assert torch.allclose(gamma_of(out[name], True).norm(), gamma_of(state[name], True).norm())


@pytest.mark.parametrize("zero_centered", [False, True])
def test_absorption_is_exact_under_constant_rms(zero_centered):
    from megatron.core.transformer.transformer_config import TransformerConfig

    g = torch.Generator().manual_seed(0)
    h, inner, eps = 16, 24, 1e-6
    w = torch.randn(h, inner, generator=g, dtype=torch.float64)  # projection [out, in]
    y = torch.randn(10, h, generator=g, dtype=torch.float64)
    y = y / y.pow(2).mean(-1, keepdim=True).sqrt() * 1.7  # every token's RMS is 1.7
    a = torch.linalg.lstsq(w, y.t()).solution.t()  # inputs that produce exactly y
    config = TransformerConfig(
        num_layers=1, hidden_size=h, num_attention_heads=1, params_dtype=torch.float64,
        layernorm_zero_centered_gamma=zero_centered,
    )  # fmt: skip
    norm = RMSNorm(config, h, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h, generator=g, dtype=torch.float64))
    sandwich = norm(a @ w.t())
    folded = absorb_post_norm(w, norm.weight.detach(), 1 / (1.7**2 + eps) ** 0.5, zero_centered)
    # the norm computes in fp32: exact to fp32 rounding
    assert torch.allclose(a @ folded.t(), sandwich, rtol=1e-5, atol=1e-6)


def test_absorbing_removes_the_post_norms():
    state, arch = whole_state("gemma3")
    out = prune_model(state, arch, random_scores(arch), load_target({}, arch),
                      PruneOptions(absorb_post_norms=True))  # fmt: skip
    assert not out.arch.post_norms and not any("post_norm" in k for k in out.state)


def test_dropping_removes_the_post_norms_and_keeps_everything_else():
    """--drop-post-norms (the paper's "dropped" baseline): no post-norm left, every other
    tensor the source's bit for bit; refused beside absorption and on a model without them."""
    from megatron_prune.surgery.prune import check_scores

    state, arch = whole_state("gemma3")
    target = load_target({}, arch)
    out = prune_model(state, arch, random_scores(arch), target, PruneOptions(drop_post_norms=True))
    assert not out.arch.post_norms
    assert set(out.state) == {k for k in state if "post_norm" not in k}
    assert all(out.state[k].equal(state[k]) for k in out.state)
    with pytest.raises(TargetError, match="exclude each other"):
        check_scores(random_scores(arch), arch, target,
                     PruneOptions(absorb_post_norms=True, drop_post_norms=True))  # fmt: skip
    _, llama = whole_state("llama")
    with pytest.raises(TargetError, match="--drop-post-norms needs a sandwich-norm model"):
        check_scores(random_scores(llama), llama, load_target({}, llama),
                     PruneOptions(drop_post_norms=True))  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that equality is bit for bit (-0.0 vs 0.0, NaN payloads)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def test_prune_model_leaves_its_inputs_untouched():
    """The surgery promises pure functions: after a prune through every path (width, depth,
    CLAP, SLNP, absorption) the caller's tensors, scores and arch are unchanged, bit for bit."""
    state, arch = whole_state("gemma3")
    scores = random_scores(arch, seed=3)
    target = load_target({"hidden_size": 40, "ffn_hidden_size": 96, "num_attention_heads": 2,
                          "num_query_groups": 2, "num_layers": 3}, arch)  # fmt: skip
    before = {k: (v.dtype, v.shape, _bits(v).clone()) for k, v in state.items()}
    scores_before = {k: (v.dtype, v.shape, _bits(v).clone()) for k, v in scores.items()}
    arch_before, target_before = arch.to_dict(), repr(target)
    options = PruneOptions(clap=True, slnp=True, absorb_post_norms=True)
    out = prune_model(state, arch, scores, target, options)
    assert out.dropped_layers and out.clap_donors and not out.arch.post_norms  # every path ran
    for inputs, copies in ((state, before), (scores, scores_before)):
        assert sorted(inputs) == sorted(copies)
        for k, (dtype, shape, bits) in copies.items():
            assert (inputs[k].dtype, inputs[k].shape) == (dtype, shape), k
            assert torch.equal(_bits(inputs[k]), bits), k
    assert arch.to_dict() == arch_before and repr(target) == target_before


def test_target_validation_names_the_problem_and_nearby_values():
    _, arch = whole_state("qwen2")  # h=64, f=128, n=4, g=2, L=4
    cases = [
        ({"num_attention_heads": 3}, "not a multiple of num_query_groups=2 (try 2, 4)"),
        ({"ffn_hidden_size": 256}, "ffn_hidden_size=256 must be between 1 and the source's 128"),
        ({"ffn_hidden_size": [64, 64, 64]}, "a list of 4 integers (one per kept layer)"),
        ({"hidden": 32}, "unknown key in the target: 'hidden' (did you mean 'hidden_size'"),
        ({"drop_layers": [1], "num_layers": 2}, "disagrees with dropping 1 of 4"),
        ({"drop_layers": [7]}, "drop_layers [7] outside 0..3"),
    ]
    for data, message in cases:
        with pytest.raises(
            TargetError,
            match=message.replace("(", r"\(")
            .replace(")", r"\)")
            .replace("[", r"\[")
            .replace("]", r"\]"),
        ):
            load_target(data, arch)
    with pytest.raises(
        TargetError, match=r"ffn_hidden_size=100 is not divisible by TP=8 \(try 96, 104\)"
    ):
        load_target({"ffn_hidden_size": 100, "num_attention_heads": 4}, arch, tp=8)
    with pytest.raises(TargetError, match="does not divide num_layers=3"):
        load_target({"num_layers": 3}, arch, pp=2)
