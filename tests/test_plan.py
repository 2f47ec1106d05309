"""The ``plan`` stage: cost model, AlphaPruning's ratio mapping, uniform and alpha allocations
(valid at TP=1 and TP=2, budget met), layout invariance on a SmolLM2-shaped model, refusals,
and the CLI's plan file accepted by ``prune``'s checks. Pure arithmetic: no weights, no ranks."""

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from megatron_prune import api
from megatron_prune.checkpoint.metadata import CheckpointMeta
from megatron_prune.cli import main
from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch
from megatron_prune.plan import cost, strategies
from megatron_prune.plan.cost import parse_budget
from megatron_prune.plan.planfile import _collapse, plan_fractions
from megatron_prune.plan.target import load_target
from tests.tiny_models import random_scores

TINY = ModelArch(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=256,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=250,
                 max_position_embeddings=128, tie_embeddings=True)  # fmt: skip
SMOL = ModelArch(family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                 num_attention_heads=9, num_query_groups=3, head_dim=64, vocab_size=49152,
                 max_position_embeddings=8192, tie_embeddings=True)  # fmt: skip
SEQ = 128  # tiny: at 2048 tokens attention's 4*s*n*d term dwarfs the matmuls


def alphas_for(arch: ModelArch, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"esd/alpha": torch.tensor(rng.uniform(2.0, 6.0, (arch.num_layers, 7)))}


def make(arch, strategy, budget, tp, dims=strategies.DEFAULT_DIMS, seq_len=SEQ, pp=1):
    b = parse_budget(budget)
    if strategy == "uniform":
        target = strategies.uniform(arch, b, dims, tp, pp, seq_len)
    else:
        target = strategies.alpha(arch, b, alphas_for(arch), dims, tp, pp, seq_len)
    return _collapse(target)


def test_cost_model_counts():
    # one tiny layer by hand: QKV 64*(4+2*2)*16, proj 4*16*64, FFN 3*64*256, norms 2*64
    layer = 64 * 8 * 16 + 4 * 16 * 64 + 3 * 64 * 256 + 2 * 64
    assert cost.block_params(TINY) == 4 * layer
    assert cost.model_params(TINY) == 4 * layer + 256 * 64 + 64  # tied embedding, final norm
    matmul = layer - 2 * 64
    assert cost.block_flops(TINY, 100) == 4 * (2 * matmul + 4 * 100 * 4 * 16)
    assert cost.latency_proxy(TINY, 100) == cost.block_flops(TINY, 100)  # analytic proxy
    het = ModelArch.from_dict({**TINY.to_dict(), "layer_ffn_hidden_size": (256, 128, 256, 64)})
    assert cost.block_params(het) == cost.block_params(TINY) - 3 * 64 * (128 + 192)


@pytest.mark.parametrize("keep,eps", [(0.5, 0.3), (0.2, 0.3), (0.8, 0.2), (0.05, 0.3), (1.0, 0.3)])
def test_alpha_ratios_meet_the_mean_and_the_bounds(keep, eps):
    rng = np.random.default_rng(1)
    alphas = rng.uniform(2, 8, 12)
    alphas[3] = 30.0  # an outlier whose share is clipped at small keeps
    weights = rng.uniform(1, 2, 12)
    r = strategies.alpha_keep_ratios(alphas, keep, eps, weights)
    assert r.min() >= 0 and r.max() <= 1
    assert np.isclose((r * weights).sum() / weights.sum(), keep)
    if keep < 1:  # higher alpha (less heavy-tailed) keeps less
        order = np.argsort(alphas)
        assert np.all(np.diff(r[order]) <= 1e-12)
    # the docstring's worked example
    assert np.allclose(strategies.alpha_keep_ratios([2, 3, 4], 0.5, 0.3), [0.65, 0.5, 0.35])
    assert np.allclose(strategies.alpha_keep_ratios([5, 5], 0.4, 0.3), [0.4, 0.4])


@pytest.mark.parametrize("strategy", ["uniform", "alpha"])
@pytest.mark.parametrize("budget", ["params=0.5", "params=0.3", "params=0.9", "flops=0.5",
                                    "flops=0.8", "latency=0.6"])  # fmt: skip
@pytest.mark.parametrize("tp", [1, 2])
def test_every_plan_is_valid_and_meets_its_budget(strategy, budget, tp):
    target = make(TINY, strategy, budget, tp)
    load_target(target, TINY, tp=tp)  # what prune checks
    b = parse_budget(budget)
    achieved = plan_fractions(TINY, target, SEQ)[b.metric]
    assert abs(achieved / b.keep - 1) <= cost.TOLERANCE, achieved


def test_uniform_prunes_hidden_and_depth_when_asked():
    target = make(SMOL, "uniform", "params=0.5", 3, dims=strategies.DIMS, seq_len=2048, pp=2)
    load_target(target, SMOL, tp=3, pp=2)
    assert target["num_layers"] < 30 and target["num_layers"] % 2 == 0
    assert target["hidden_size"] < 576
    assert parse_budget("params=0.5").met_by(plan_fractions(SMOL, target, 2048)["params"])


@pytest.mark.parametrize("strategy", ["uniform", "alpha"])
@pytest.mark.parametrize("budget", ["params=0.5", "params=0.35", "flops=0.6", "latency=0.75"])
def test_plan_at_tp1_equals_plan_at_tp3_on_smollm2(strategy, budget):
    # FFN steps of 12 (1536 / 128) and whole groups kept: the TP=1 and TP=3 grids coincide.
    one = make(SMOL, strategy, budget, 1, seq_len=2048)
    three = make(SMOL, strategy, budget, 3, seq_len=2048)
    load_target(one, SMOL, tp=3)
    assert one == three


@pytest.mark.parametrize("strategy", ["uniform", "alpha"])
def test_tp1_and_tp3_plans_agree_whenever_both_are_valid_with_groups(strategy):
    # With --prune groups, TP=1 may keep 1 or 2 of SmolLM2's 3 groups, which TP=3 cannot
    # (groups divisible by 3): those TP=1 plans are invalid at TP=3, and the groups dimension
    # drops out of the TP=3 objective, so only plans valid at both are compared.
    dims = ("ffn", "heads", "groups")
    for budget in ("params=0.5", "params=0.8", "flops=0.6"):
        one = make(SMOL, strategy, budget, 1, dims=dims, seq_len=2048)
        three = make(SMOL, strategy, budget, 3, dims=dims, seq_len=2048)
        load_target(three, SMOL, tp=3)
        try:
            load_target(one, SMOL, tp=3)
        except UserError:
            continue
        assert one == three


@pytest.mark.parametrize("budget", ["params", "params=", "params=0", "params=1.5", "speed=0.5",
                                    "flops=abc", "0.5"])  # fmt: skip
def test_bad_budgets_are_refused(budget):
    with pytest.raises(UserError):
        parse_budget(budget)


def test_bad_strategies_and_dims_are_refused(tmp_path):
    ckpt, scores = _fake_checkpoint(tmp_path)
    for kwargs in ({"strategy": "tyr"}, {"strategy": "magic"}, {"prune": "ffn,width"},
                   {"tp": 0}, {"alpha_eps": 1.5}):  # fmt: skip
        with pytest.raises(UserError):
            api.check_plan(ckpt, scores, tmp_path / "p.yaml", budget="params=0.5", **kwargs)
    with pytest.raises(UserError, match="needs ESD alphas"):
        api.check_plan(ckpt, scores, tmp_path / "p.yaml", budget="params=0.5", strategy="alpha")
    with pytest.raises(UserError, match="global"):
        strategies.alpha(TINY, parse_budget("params=0.5"), alphas_for(TINY), ("ffn", "depth"))
    with pytest.raises(UserError, match="no uniform plan"):
        strategies.uniform(TINY, parse_budget("flops=0.5"), ("ffn",), seq_len=2048)


def _fake_checkpoint(tmp_path, esd: bool = False):
    """A checkpoint folder with metadata only (plan reads no weights) and a score folder."""
    ckpt, scores = tmp_path / "ckpt", tmp_path / "scores"
    ckpt.mkdir()
    scores.mkdir()
    CheckpointMeta(arch=TINY, layout={"tp": 1, "pp": 1}).write(ckpt)
    table = random_scores(TINY)
    if esd:
        table["esd/alpha"] = alphas_for(TINY)["esd/alpha"].float()
        table["esd/block_alpha"] = table["esd/alpha"].mean(1)
    save_file(table, str(scores / "scores.safetensors"))
    (scores / "meta.json").write_text(json.dumps({"format_version": 1, "arch": TINY.to_dict()}))
    return ckpt, scores


@pytest.mark.parametrize("tp", [1, 2])
def test_cli_plan_file_is_accepted_by_prune(tmp_path, tp):
    ckpt, scores = _fake_checkpoint(tmp_path, esd=True)
    out = tmp_path / "plan.yaml"
    rc = main(["plan", str(ckpt), "--scores", str(scores), "--budget", "params=0.5",
               "--strategy", "alpha", "--seq-len", "128", "--out", str(out), "--tp", str(tp)])
    assert rc == 0
    data = yaml.safe_load(out.read_text())
    record = data["plan"]
    assert record["format_version"] == 1 and record["strategy"] == "alpha"
    assert record["budget"] == "params=0.5" and record["validated_at"] == {"tp": tp, "pp": 1}
    assert abs(record["achieved"]["params"] - 0.5) <= 0.005
    assert isinstance(data["ffn_hidden_size"], list)  # per-layer widths
    _, target, _ = api.check_prune(ckpt, scores, out, tmp_path / "pruned",
                                   layout=api.ParallelLayout(tp=tp))  # fmt: skip
    assert target.ffn_hidden_size == tuple(data["ffn_hidden_size"])
    assert main(["plan", str(ckpt), "--budget", "params=0.5", "--out", str(out)]) == 2  # exists
