"""tools/recovery_study.py end to end on tiny models (its real runs are SmolLM2 and Gemma 3; see
README, "Recovery study"): every variant is pruned, scored zero-shot, distilled on the same
budget, the baseline twice and the best variant once more on the LM loss, and the table and
the claims come out of the finished runs; a second launch skips every step."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

TINY_TARGET = {"joint": {"num_layers": 3, "hidden_size": 48, "ffn_hidden_size": 96},
               "shortgpt_layers": 2}  # fmt: skip


def _study(tmp, *extra):
    cmd = [sys.executable, str(REPO / "tools/recovery_study.py"), "--out", str(tmp / "study"),
           "--source", f"smollm2={tmp / 'llama'}", "--source", f"gemma3={tmp / 'gemma3'}",
           "--targets", str(tmp / "targets.json"), "--train-tokens", "128", "--seq-len", "16",
           "--global-batch", "2", "--samples", "4", "--eval-tokens", "96", "--eval-points", "2",
           *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=3000, cwd=REPO)


def _tool():
    path = REPO / "tools" / "recovery_study.py"
    spec = importlib.util.spec_from_file_location("recovery_study", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_claims_are_judged_against_the_relative_seed_noise():
    """Gaps and noise are relative to the perplexities' scale, so one noise level judges both
    models; a study without the second seed takes the noise it is given."""
    tool = _tool()
    smollm2 = {"minitron": {"after_kd": 100.0, "seed2": 110.0},
               "+clap": {"after_kd": 85.0, "lm_only": 90.0}, "+clap+slnp": {"after_kd": 95.0},
               "shortgpt": {"after_kd": 140.0}, "alpha-plan": {"after_kd": 97.0}}  # fmt: skip
    found = {c["claim"]: c for c in tool.claims({"smollm2": smollm2})}
    assert found["CLAP > no CLAP"]["noise"] == pytest.approx(10 / 105)
    assert found["CLAP > no CLAP"]["gap"] == pytest.approx(15 / 92.5)
    assert found["CLAP > no CLAP"]["verdict"] == "holds"
    assert found["SLNP > no SLNP"]["gap"] == pytest.approx(-10 / 90)  # beyond -9.5%
    assert found["SLNP > no SLNP"]["verdict"] == "does not hold"
    assert found["joint width+depth > depth-only"]["verdict"] == "holds"
    assert found["AlphaPruning allocation > uniform"]["verdict"] == "within noise"  # +3.1%
    assert found["KD > LM loss (+clap)"]["verdict"] == "within noise"  # +5.7%
    gemma3 = {"sandwich": {"after_kd": 1000.0}, "absorbed": {"after_kd": 1050.0},
              "dropped": {"after_kd": 3000.0}}  # fmt: skip
    (claim,) = tool.claims({"gemma3": gemma3}, noise=0.1)
    assert claim["noise"] == 0.1 and claim["verdict"] == "holds"
    gemma3["absorbed"]["after_kd"] = 1500.0  # far above dropped, but 40% off the sandwich
    assert tool.claims({"gemma3": gemma3}, noise=0.1)[0]["verdict"].startswith("half")
    gemma3["absorbed"]["after_kd"] = 2800.0  # within the noise of dropped
    assert tool.claims({"gemma3": gemma3}, noise=0.1)[0]["verdict"] == "does not hold"


@pytest.mark.slow  # about 40 CLI steps: `make test-all`
def test_recovery_study_runs_every_variant_and_states_each_claim(tmp_path, austen_calibration_text):
    text = austen_calibration_text.read_text()[:50_000]
    for family, folder in (("llama", "llama"), ("gemma3", "gemma3")):
        save_word_tokenizer(save_hf_model(make_hf_model(family, seed=3), tmp_path / folder), text)
    (tmp_path / "targets.json").write_text(json.dumps({"smollm2": TINY_TARGET,
                                                       "gemma3": TINY_TARGET}))  # fmt: skip
    first = _study(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    smollm2, gemma3 = study["results"]["smollm2"], study["results"]["gemma3"]
    assert set(smollm2) == {"dense", "minitron", "+clap", "+clap+slnp", "shortgpt", "alpha-plan"}
    assert set(gemma3) == {"dense", "sandwich", "absorbed", "dropped"}
    for rows in (smollm2, gemma3):
        for name, row in rows.items():
            if name != "dense":
                assert row["block_params"] < rows["dense"]["block_params"]
                assert len(row["curve"]) == 2 and row["after_kd"] == row["curve"][-1][1]
    assert "seed2" in smollm2["minitron"]
    best = min((n for n in smollm2 if n != "dense"), key=lambda n: smollm2[n]["after_kd"])
    assert "lm_only" in smollm2[best]
    claims = {c["claim"] for c in study["claims"]}
    assert {"CLAP > no CLAP", "SLNP > no SLNP", "joint width+depth > depth-only",
            "AlphaPruning allocation > uniform",
            "absorbed close to the sandwich and far above dropped"} <= claims  # fmt: skip
    assert all(c["verdict"] in ("holds", "within noise", "does not hold")
               or c["verdict"].startswith("half") for c in study["claims"])
    assert (tmp_path / "study" / "report" / "report.md").is_file()
    assert "| claim (after KD) |" in (tmp_path / "study" / "study.md").read_text()
    assert all((tmp_path / "study" / f"curves_{m}.png").is_file() for m in ("smollm2", "gemma3"))
    assert study["seconds"] > 0

    again = _study(tmp_path)  # everything finished: the recipe skips every step
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "study" / "study.json").read_text())["results"] == study[
        "results"
    ]
