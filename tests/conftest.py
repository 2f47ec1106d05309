"""Shared fixtures: real text from a package registry, and a tiny scored model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def austen_eval_text() -> Path:
    from megatron_prune.data.corpus import cache_dir, write_splits

    return write_splits(cache_dir() / "text")[1]


@pytest.fixture(scope="session")
def austen_calibration_text() -> Path:
    from megatron_prune.data.corpus import cache_dir, write_splits

    return write_splits(cache_dir() / "text")[0]


# A tiny sandwich-norm model (Gemma 3 shaped, random weights, word tokenizer on Austen text),
# converted and scored at TP=1 (with a stopped + resumed run and a direct computation) and at
# several layouts; shared by the scoring and surgery tests.
JOB = {
    "samples": 6, "seq_len": 24, "seed": 7, "micro_batches": 1, "ppl_samples": 2,
    "metrics": ["channel", "esd", "flap", "group", "head", "layer", "layer_ppl", "minitron",
                "neuron", "post_norm", "wanda"],
}  # fmt: skip
LAYOUTS = {
    "tp2": {"tp": 2},
    "tp2_mbs2": {"tp": 2},  # two samples per micro-batch, same scores
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "dp2": {"tp": 1},
}


@pytest.fixture(scope="session")
def scored(tmp_path_factory, austen_calibration_text):
    from tests.helpers import torchrun
    from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

    tmp = tmp_path_factory.mktemp("scoring")
    text = austen_calibration_text.read_text()[:200_000]
    (tmp / "calib.txt").write_text(text)
    folder = save_hf_model(make_hf_model("gemma3", seed=11), tmp / "hf")
    save_word_tokenizer(folder, text)
    job = {**JOB, "data": str(tmp / "calib.txt")}
    (tmp / "ref.json").write_text(json.dumps({"hf": str(folder), "workdir": str(tmp), "job": job}))
    torchrun("score_reference.py", 1, str(tmp / "ref.json"))
    spec = {"ckpt": str(tmp / "ckpt"), "workdir": str(tmp), "layouts": LAYOUTS, "job": job}
    (tmp / "layouts.json").write_text(json.dumps(spec))
    torchrun("score_layouts.py", 2, str(tmp / "layouts.json"))
    return tmp
