"""megatron-prune inside the real Megatron-LM training code.

Megatron-LM's training code is not on PyPI, so the end-to-end check (tools/check_megatron_lm.py:
the documented lines in the real ``pretrain_gpt.py``, run on this CPU with gloo) runs only when
``MEGATRON_LM`` names a checkout at a supported tag, e.g. NVIDIA/Megatron-LM core_v0.16.1, with
requirements-megatron-lm.txt installed. What needs no checkout runs everywhere: the docs show the
very lines the check applies, and the args of a Megatron-LM checkpoint give its vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _check_tool():
    path = ROOT / "tools/check_megatron_lm.py"
    spec = importlib.util.spec_from_file_location("check_megatron_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_show_the_lines_the_real_check_applies():
    docs = (ROOT / "docs/megatron_lm.md").read_text()
    for original, replacement in _check_tool().DOCUMENTED_EDITS:
        for line in set(replacement.splitlines()) - set(original.splitlines()):
            code = line.split("#")[0].strip()
            assert code in docs, f"docs/megatron_lm.md lacks {code!r}"


def _args(**overrides) -> Namespace:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                group_query_attention=True, num_query_groups=2, kv_channels=16,
                padded_vocab_size=256, vocab_size=250, norm_epsilon=1e-5, rotary_base=500,
                max_position_embeddings=128)  # fmt: skip
    return Namespace(**{**base, **overrides})


def test_null_tokenizer_checkpoint_counts_its_end_of_document_token():
    from megatron_prune.checkpoint.megatron_lm_format import arch_from_args

    assert arch_from_args(_args()).vocab_size == 250
    assert arch_from_args(_args(tokenizer_type="NullTokenizer", vocab_size=249)).vocab_size == 250
    assert arch_from_args(_args(tokenizer_type="NullTokenizer"), vocab_size=240).vocab_size == 240


CHECKOUT = os.environ.get("MEGATRON_LM")


@pytest.mark.skipif(not CHECKOUT, reason="MEGATRON_LM (a Megatron-LM checkout) is not set")
@pytest.mark.parametrize(
    "layout",
    [["--tp", "1"], ["--tp", "2"], ["--pp", "2", "--vpp", "2"], ["--pp", "4"],
     ["--tp", "2", "--pp", "2"]],
    ids=["tp1", "tp2", "pp2_vpp2", "pp4", "tp2_pp2"],
)  # fmt: skip
def test_documented_lines_in_the_real_pretrain_gpt(tmp_path, austen_calibration_text, layout):
    from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

    folder = save_hf_model(make_hf_model("llama", seed=2), tmp_path / "hf")
    save_word_tokenizer(folder, austen_calibration_text.read_text()[:50_000])
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools/check_megatron_lm.py"), "--megatron-lm", CHECKOUT,
         "--source", str(folder), "--workdir", str(tmp_path / "work"), "--out", str(out), *layout],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert all(report["checks"].values()), report["checks"]
    assert report["logits_gap_loaded_student"] <= 1e-4
    assert report["logits_gap_saved_converted"] <= 1e-4
    assert report["kl_keep_all_first"] < 1e-3 < report["kl_random_first"]


def test_modelopt_distillation_flag_is_refused_beside_ours():
    """pretrain_gpt.py keeps ModelOpt's flags (``also=add_modelopt_args``); asking ModelOpt to
    distil too (--export-kd-teacher-load) would build a second teacher: one clear error."""
    from megatron_prune import megatron_lm as kd
    from megatron_prune.errors import UserError

    parser = kd.add_distillation_args(ArgumentParser())
    args = parser.parse_args(["--kd-teacher", "T", "--kd-temperature", "2"])
    assert kd.settings_from_args(args).loss.temperature == 2.0
    args.export_kd_teacher_load = "MODELOPT_TEACHER"
    with pytest.raises(UserError, match="--export-kd-teacher-load"):
        kd.settings_from_args(args)
