"""Pruning at the model level, through the prune command at TP=1 and TP=2: keep-everything gives
bit-identical logits; dropping a layer equals running the source with that layer skipped; the
pruned checkpoint is tensor-for-tensor identical whether its scores came from TP=1 or TP=2 and
whether it is saved at TP=1 or TP=2; an absorbed sandwich model runs without post-norms and
gives the logits of the unabsorbed pruned model with each post-norm replaced by its constant
scale."""

import json

import pytest

from tests.helpers import cli, torchrun


@pytest.fixture(scope="module")
def report(scored):
    torchrun("prune_checks.py", 2, str(scored))
    return json.loads((scored / "prune_report.json").read_text())


def test_keep_everything_gives_identical_logits(report):
    assert report["identity_equal"]


def test_dropping_a_layer_equals_skipping_it(report):
    assert report["drop_vs_skip_max_diff"] == 0.0, report["drop_info"]


def test_pruned_checkpoint_does_not_depend_on_layouts(report):
    assert report["layouts_keys_equal"] and report["layouts_unequal"] == []


def test_surgery_on_the_shards_equals_the_whole_model_surgery(report):
    # written at TP=1, TP=2 and PP=2, each rank reading only its own layers: bit for bit
    assert report["shards_vs_whole_unequal"] == []


def test_absorbed_model_equals_the_sandwich_with_constant_post_norm_scales(report):
    assert report["absorbed_meta"] is False  # written, and run, without post-norms
    scale = report["absorbed_logit_scale"]
    assert report["absorbed_vs_constant_scale_max_diff"] <= 1e-5 * scale  # fp32 rounding
    assert report["absorbed_vs_sandwich_max_diff"] > 1e-2 * scale  # the check discriminates


def test_bad_prune_inputs(scored, tmp_path):
    target = tmp_path / "t.yaml"
    target.write_text("num_attention_heads: 3\n")
    base = [
        "prune",
        str(scored / "ckpt"),
        "--scores",
        str(scored / "ref"),
        "--out",
        str(tmp_path / "o"),
    ]
    r = cli(*base, "--target", str(target))
    assert r.returncode != 0 and "not a multiple of num_query_groups=2 (try 2, 4)" in r.stderr
    target.write_text("ffn_hidden_size: 60\n")
    r = cli(*base, "--target", str(target), "--tp", "8")
    assert r.returncode != 0 and "not divisible by TP=8 (try 56, 64)" in r.stderr
    assert not (tmp_path / "o").exists()
