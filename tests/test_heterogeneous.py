"""Per-layer (heterogeneous) pruning targets, end to end.

Single process: the architecture record, per-layer width surgery (heads inside each group,
groups by group score, neurons by neuron score, layer by layer), CLAP with per-layer groups,
identity on a heterogeneous source, target validation, HF config choice.
One torchrun launch (tests/workers/hetero_checks.py): a heterogeneous model pruned through the
prune command runs the same logits at TP=1, TP=2, TP=2+SP, PP=2 and PP=2 x VPP=2, reshards,
trains one step identically at TP=1 and TP=2; per-layer lists equal to the source give the
source bit for bit; HF exports (absorbed + heterogeneous Gemma 3, heterogeneous Llama) load in
transformers with trust_remote_code and give our logits.
"""

import json
import re

import pytest
import torch

from megatron_prune.errors import UserError
from megatron_prune.models.arch import ArchError, ModelArch
from megatron_prune.models.families import get_family
from megatron_prune.plan.target import TargetError, load_target
from megatron_prune.surgery.prune import PruneOptions, prune_model
from megatron_prune.surgery.state import ModelState, split_qkv
from tests.helpers import torchrun
from tests.tiny_models import random_scores, whole_state

SMALL = dict(family="llama", num_layers=3, hidden_size=8, ffn_hidden_size=12,
             num_attention_heads=4, num_query_groups=2, head_dim=2, vocab_size=10)  # fmt: skip


def test_arch_records_per_layer_widths():
    per_layer = {"layer_ffn_hidden_size": [12, 6, 30], "layer_num_attention_heads": [4, 2, 4],
                 "layer_num_query_groups": (2, 2, 2)}  # fmt: skip
    arch = ModelArch(**SMALL, **per_layer)
    assert arch.heterogeneous and arch.ffn_hidden_size == 30 and arch.num_attention_heads == 4
    assert arch.layer_num_query_groups is None  # equal values collapse to the scalar
    assert tuple(arch.widths(1)) == (6, 2, 2)
    assert ModelArch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch
    uniform = ModelArch(**SMALL, layer_ffn_hidden_size=[12] * 3)
    assert uniform == ModelArch(**SMALL) and not uniform.heterogeneous
    with pytest.raises(ArchError, match=r"TP=4 does not divide ffn_hidden_size=6 in layers \[1\]"):
        arch.check_layout(4, 1)
    with pytest.raises(ArchError, match=r"num_attention_heads=3 is not a multiple of .*=2"):
        ModelArch(**SMALL, layer_num_attention_heads=[4, 3, 4])
    with pytest.raises(ArchError, match="has 2 values for 3 layers"):
        ModelArch(**SMALL, layer_ffn_hidden_size=[4, 4])


def test_per_layer_widths_keep_each_layers_top_units():
    state, arch = whole_state("qwen2")  # n=4 heads in g=2 groups (p=2), f=128, 4 layers
    scores = random_scores(arch, seed=3)
    target = {"ffn_hidden_size": [64, 128, 96, 32], "num_attention_heads": [2, 4, 2, 2],
              "num_query_groups": [2, 2, 1, 1]}  # fmt: skip
    out = prune_model(state, arch, scores, load_target(target, arch))
    assert out.arch.layer_ffn_hidden_size == (64, 128, 96, 32)
    assert out.arch.layer_num_query_groups == (2, 2, 1, 1)
    new, old = ModelState.from_flat(out.state).layers, ModelState.from_flat(state).layers
    assert all(torch.equal(new[1][k], old[1][k]) for k in old[1])  # layer 1 keeps its widths
    d, heads = arch.head_dim, scores["head/l2"]
    q, k, _ = split_qkv(old[0]["self_attention.linear_qkv.weight"], 2, d)
    q0, _, _ = split_qkv(new[0]["self_attention.linear_qkv.weight"], 2, d)
    for g in range(2):  # layer 0: the better head inside each group
        assert torch.equal(q0[g, 0], q[g, int(heads[0].view(2, 2)[g].argmax())])
    # layer 2: one group of both heads, the group with the higher mean head score (Eq. 5)
    best = int(heads[2].view(2, 2).double().mean(1).argmax())
    _, k2, _ = split_qkv(old[2]["self_attention.linear_qkv.weight"], 2, d)
    _, k2_new, _ = split_qkv(new[2]["self_attention.linear_qkv.weight"], 1, d)
    assert torch.equal(k2_new[0], k2[best])
    neurons = scores["neuron/l2"][3].argsort(descending=True)[:32].sort().values
    assert torch.equal(new[3]["mlp.linear_fc2.weight"], old[3]["mlp.linear_fc2.weight"][:, neurons])


def test_clap_with_per_layer_groups():
    state, arch = whole_state("qwen2")
    scores = random_scores(arch, seed=4)
    target = load_target({"drop_layers": [2], "num_attention_heads": [2, 1, 4],
                          "num_query_groups": [2, 1, 2]}, arch)  # fmt: skip
    out = prune_model(state, arch, scores, target, PruneOptions(clap=True))
    assert out.clap_donors == {1: [2]}
    # kept layer 1 has one group of one head: the best of layer 1's and layer 2's four groups
    heads = scores["head/l2"]
    candidates = [(layer, g, float(heads[layer].view(2, 2)[g].max())) for layer in (1, 2)
                  for g in range(2)]  # fmt: skip
    layer, g, _ = max(candidates, key=lambda c: c[2])
    d = arch.head_dim
    _, k, v = split_qkv(state[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"], 2, d)
    new = out.state["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert new.shape[0] == 3 * d and torch.equal(new[d : 2 * d], k[g])
    assert out.arch.layer_num_attention_heads == (2, 1, 4)


def test_per_layer_identity_on_a_heterogeneous_source():
    state, arch = whole_state("gemma3")
    target = {"ffn_hidden_size": [64, 128, 32, 96], "num_attention_heads": [2, 4, 1, 4],
              "num_query_groups": [1, 2, 1, 2]}  # fmt: skip
    het = prune_model(state, arch, random_scores(arch), load_target(target, arch))
    for again in (target, {}):  # explicit lists, or omitted keys: each layer keeps its widths
        out = prune_model(het.state, het.arch, {}, load_target(again, het.arch))
        assert out.arch == het.arch
        assert all(torch.equal(out.state[k], het.state[k]) for k in het.state)


@pytest.mark.parametrize(
    ("target", "tp", "message"),
    [
        ({"ffn_hidden_size": [64, 64]}, 1, "give one value, or a list of 4 integers (one per kept "
         "layer); got [64, 64]"),
        ({"drop_layers": [0], "ffn_hidden_size": [64] * 4}, 1, "a list of 3 integers"),
        ({"ffn_hidden_size": [64, 60, 64, 60]}, 8,
         "ffn_hidden_size=60 (kept layers [1, 3]) is not divisible by TP=8 (try 56, 64)"),
        ({"num_attention_heads": [4, 3, 4, 4]}, 1, "num_attention_heads=3 is not a multiple of "
         "num_query_groups=2 (kept layers [1]) (try 2, 4)"),
        ({"ffn_hidden_size": [64, 256, 64, 64]}, 1,
         "ffn_hidden_size=256 (kept layers [1]) must be between 1 and the source's 128"),
        ({"num_attention_heads": [4, 4, 3, 4], "num_query_groups": [2, 2, 1, 2]}, 1,
         "3 heads per group (kept layers [2]) exceeds the source's 2"),
        ({"num_query_groups": [2, 1, 2, 2], "num_attention_heads": [4, 2, 4, 4]}, 2,
         "num_query_groups=1 (kept layers [1]) is not divisible by TP=2 (try 2)"),
    ],
)  # fmt: skip
def test_bad_per_layer_targets_fail_early(target, tp, message):
    _, arch = whole_state("qwen2")
    with pytest.raises(TargetError, match=re.escape(message)):
        load_target(target, arch, tp=tp)


def test_hf_export_uses_the_stock_class_when_it_can():
    _, gemma = whole_state("gemma3")
    family = get_family("gemma3")
    assert "auto_map" not in family.write_hf_config(gemma)
    absorbed = ModelArch.from_dict({**gemma.to_dict(), "post_norms": False})
    cfg = family.write_hf_config(absorbed)
    assert cfg["auto_map"] and cfg["megatron_prune"]["base_class"] == "Gemma3ForCausalLM"
    assert family.read_hf_config(cfg) == absorbed
    _, llama = whole_state("llama")
    het = ModelArch.from_dict({**llama.to_dict(), "layer_ffn_hidden_size": [8, 16, 8, 16]})
    cfg = get_family("llama").write_hf_config(het)
    assert [w["intermediate_size"] for w in cfg["megatron_prune"]["layer_widths"]] == [8, 16] * 2
    assert get_family("llama").read_hf_config(cfg) == het


def test_scoring_a_heterogeneous_checkpoint_is_refused(tmp_path):
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.cli import build_parser

    arch = ModelArch(**SMALL, layer_ffn_hidden_size=[12, 6, 12])
    (tmp_path / "ckpt").mkdir()
    CheckpointMeta(arch=arch, layout={}).write(tmp_path / "ckpt")
    (tmp_path / "data.txt").write_text("text")
    ckpt = str(tmp_path / "ckpt")
    args = build_parser().parse_args(["score", ckpt, "--data", str(tmp_path / "data.txt"),
                                      "--samples", "1", "--seq-len", "4", "--out",
                                      str(tmp_path / "s")])  # fmt: skip
    with pytest.raises(UserError, match="per-layer widths"):
        args.module.validate(args)


# ---------------------------------------------------------------------------- model level


@pytest.fixture(scope="module")
def report(scored):
    torchrun("hetero_checks.py", 2, str(scored))
    return json.loads((scored / "hetero" / "report.json").read_text())


def test_per_layer_lists_equal_to_the_source_give_identical_logits(report):
    assert report["identity_equal"] and not report["identity_heterogeneous"]


def test_heterogeneous_model_gives_the_same_logits_at_every_layout(report):
    arch = report["a_arch"]
    assert arch["layer_ffn_hidden_size"] == [64, 128, 32, 96]
    assert arch["layer_num_attention_heads"] == [2, 4, 4, 2]
    for layout, diff in report["a_layouts"].items():
        assert diff <= 1e-5, f"{layout}: max |logit diff| {diff:.2e}"
    assert report["b_pp2"] <= 1e-5


def test_heterogeneous_checkpoint_reshards(report):
    assert report["reshard_tensors_equal"] and report["reshard_tp2_logits_equal"]


def test_heterogeneous_model_trains_the_same_at_tp1_and_tp2(report):
    train = report["train"]
    assert train["grad_keys_equal"] and train["grad_max_diff"] <= 1e-5
    for key in ("loss", "after", "norm"):
        a, b = train[key]
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), f"{key}: {a} vs {b}"
    assert train["after"][0] < train["loss"][0]  # the step did something sensible


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_hf_export_loads_in_transformers_with_our_logits(report, scored, name):
    from transformers import AutoModelForCausalLM

    export = report["b_export" if name == "gemma3" else "llama_export"]
    assert export["arch_equal"] and export["tensors_equal"]  # read back by `convert`
    folder = scored / "hetero" / f"{name}_hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_megatron_prune.")
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), trust_remote_code=True, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = torch.load(scored / "hetero" / "tokens.pt")
    with torch.no_grad():
        theirs = model(tokens).logits
    ours = torch.load(scored / "hetero" / f"{name}_hf.logits.pt")
    assert (theirs - ours).abs().max() <= 1e-4
