"""Checkpoints Megatron-LM jobs load, and Megatron-LM checkpoints as sources.

One torchrun launch (2 ranks, tests/workers/megatron_core_interop.py) on a tiny Llama:
* our checkpoint has Megatron-LM's ``--load`` layout (tracker file, ``release/``);
* it loads, through dist_checkpointing, into megatron-core's own standard GPT model (the local
  spec of ``--transformer-impl local``) built from the flags ``megatron_lm_flags`` prints, with
  no tensor missing and the same logits (fp32, 1e-5), at TP=1 and TP=2;
* that model saved as Megatron-LM's ``--save`` does (``iter_0000010/``, ``args`` in the common
  state, no megatron_prune.json) converts back to the same logits and architecture.
"""

import json

import pytest

from tests.helpers import torchrun
from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer


@pytest.fixture(scope="module")
def report(tmp_path_factory, austen_calibration_text):
    tmp = tmp_path_factory.mktemp("megatron_lm")
    folder = save_hf_model(make_hf_model("llama", seed=2), tmp / "hf")
    save_word_tokenizer(folder, austen_calibration_text.read_text()[:50_000])
    spec = {"hf": str(folder), "workdir": str(tmp), "out": str(tmp / "report.json"),
            "text": str(austen_calibration_text)}
    (tmp / "spec.json").write_text(json.dumps(spec))
    torchrun("megatron_core_interop.py", 2, str(tmp / "spec.json"))
    return {**json.loads((tmp / "report.json").read_text()), "workdir": str(tmp)}


def test_checkpoints_of_the_earlier_layout_still_load(report):
    assert report["legacy_max_diff"] == 0.0


def test_our_checkpoint_has_megatron_lm_layout(report):
    assert report["tracker"] == "release"
    for flag in ("--num-query-groups", "--kv-channels", "--group-query-attention"):
        assert flag in report["flags"]


@pytest.mark.parametrize("tp", [1, 2])
def test_standard_megatron_core_model_loads_our_checkpoint(report, tp):
    assert report[f"load_tp{tp}"]["missing"] == []
    assert report[f"load_tp{tp}"]["max_diff"] <= 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_lm_save_output_converts_back(report, tp):
    assert report[f"convert_back_tp{tp}"] <= 1e-5
    assert report[f"back_arch_equal_tp{tp}"]


@pytest.mark.parametrize("saved", ["legacy_tp1", "legacy_tp2", "legacy_pp2"])
def test_megatron_lm_legacy_torch_format_converts(report, saved):
    """Megatron-LM's --ckpt-format torch output (mp_rank_TT[_PPP]/model_optim_rng.pt), saved
    at TP=1, TP=2 or split into PP=2 stages, converts to the standard model's logits."""
    assert report[saved]["max_diff"] <= 1e-5
    assert report[saved]["arch_equal"]


def test_every_command_reads_a_legacy_checkpoint_as_its_conversion(report):
    """No `convert` first: the legacy TP=2 checkpoint loads at TP=1 and TP=2, and its perplexity
    and its score + prune output equal those of its converted copy."""
    assert report["legacy_direct_tp1"] <= 1e-6 and report["legacy_direct_tp2"] <= 1e-6
    legacy_ppl, converted_ppl = report["legacy_ppl"]
    assert abs(legacy_ppl - converted_ppl) <= 1e-6 * converted_ppl
    assert report["legacy_pruned"] <= 1e-6


def test_eval_reads_a_legacy_checkpoint_from_the_command_line(report, tmp_path):
    from pathlib import Path

    from tests.helpers import cli, last_json

    legacy = Path(report["workdir"]) / "megatron_lm_torch_tp2"
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 20)
    result = cli("eval", "ppl", str(legacy), "--data", str(text), "--seq-len", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    assert last_json(result.stdout)["ppl"] > 1


def test_a_megatron_lm_checkpoint_without_a_tokenizer_names_the_way_out(report, tmp_path):
    from pathlib import Path

    from tests.helpers import cli

    legacy = Path(report["workdir"]) / "megatron_lm_torch_tp1"  # its args name no tokenizer
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 20)
    result = cli("eval", "ppl", str(legacy), "--data", str(text), "--seq-len", "16")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert "--tokenizer TOKENIZER_DIR" in lines[0]
