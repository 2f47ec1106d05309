"""Importance scoring: every metric equals a direct computation from raw activations; the same
checkpoint and data give the same scores at TP=1, TP=2, TP=2+SP, PP=2 and DP=2; a stopped and
resumed run equals an uninterrupted one; bad input fails clearly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_prune.importance.calibration import CalibrationError, packed_samples
from megatron_prune.importance.scoring import ScoreError, load_scores
from megatron_prune.models.arch import ModelArch
from tests.conftest import JOB, LAYOUTS
from tests.helpers import cli


def _scores(folder):
    return load_file(str(folder / "scores.safetensors"))


def _close(a, b, rtol=1e-5):
    return torch.allclose(a, b, rtol=rtol, atol=1e-6 * float(b.abs().max()), equal_nan=True)


def _same_ranking(ref, other, rtol=1e-5):
    """The order ``ref`` gives is the order ``other`` gives, except between entries that ``ref``
    itself cannot tell apart (within rtol): near-ties may swap, nothing else may."""
    a, b = ref.flatten().double(), other.flatten().double()
    order = torch.argsort(a, stable=True)
    a, b = a[order], b[order]
    swapped = (b[1:] - b[:-1]) < 0
    distinguishable = (a[1:] - a[:-1]) > rtol * a.abs().max()
    return not bool((swapped & distinguishable).any())


def test_every_metric_matches_a_direct_computation(scored):
    ref, direct = _scores(scored / "ref"), load_file(str(scored / "direct.safetensors"))
    assert set(direct) <= set(ref)
    for name, expected in direct.items():
        assert _close(ref[name], expected, rtol=1e-4), name
    assert ref["esd/alpha"].shape == (4, 7) and torch.isfinite(ref["esd/alpha"]).all()
    assert (ref["layer/ppl_without"] > 0).all()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_scores_are_layout_invariant(scored, layout):
    ref, other = _scores(scored / "ref"), _scores(scored / layout)
    assert sorted(ref) == sorted(other)
    for name in ref:
        assert _close(other[name], ref[name]), f"{name} differs at {layout}"
        if name.startswith(("head/", "neuron/", "group/", "channel/", "layer/block")):
            assert _same_ranking(ref[name], other[name]), f"{name}: ranking differs at {layout}"
    meta = json.loads((scored / layout / "meta.json").read_text())
    assert meta["tokens"] == JOB["samples"] * JOB["seq_len"]


def test_resume_equals_uninterrupted_run(scored):
    ref, resumed = _scores(scored / "ref"), _scores(scored / "resumed")
    for name in ref:
        assert _close(resumed[name], ref[name], rtol=1e-6), name
    assert not (scored / "resumed.partial").exists()


def test_calibration_sampling_is_deterministic_and_packed():
    ids = list(range(100))
    a = packed_samples(ids, 4, 10, seed=3)
    assert torch.equal(a, packed_samples(ids, 4, 10, seed=3))
    assert not torch.equal(a, packed_samples(ids, 4, 10, seed=4))
    assert all(int(r[0]) % 10 == 0 and torch.equal(r, torch.arange(r[0], r[0] + 10)) for r in a)
    with_bos = packed_samples(ids, 2, 10, seed=3, bos_id=-1)
    assert (with_bos[:, 0] == -1).all() and with_bos.shape == (2, 10)
    with pytest.raises(CalibrationError, match="fewer than --samples 11"):
        packed_samples(ids, 11, 10, seed=0)


def test_scores_of_another_model_are_refused(scored):
    meta = json.loads((scored / "ref" / "meta.json").read_text())
    arch = ModelArch.from_dict(meta["arch"])
    assert set(load_scores(scored / "ref", arch)) == set(_scores(scored / "ref"))
    other = ModelArch.from_dict({**meta["arch"], "family": "llama", "ffn_hidden_size": 96})
    with pytest.raises(ScoreError, match="computed for a gemma3 model that differs"):
        load_scores(scored / "ref", other)


def _fails(result, *needles):
    assert result.returncode != 0, result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_bad_score_inputs(scored, tmp_path):
    ckpt = str(scored / "ckpt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("it is a truth universally acknowledged")
    out = str(tmp_path / "s")
    base = ["score", ckpt, "--samples", "4", "--seq-len", "16", "--out", out]
    _fails(cli(*base[:2], "--data", str(empty), *base[2:]), "is empty")
    _fails(cli(*base[:2], "--data", str(short), *base[2:]), "fewer than --samples 4")
    _fails(cli(*base[:2], "--data", str(short), *base[2:], "--metrics", "taylor"),
           "invalid choice: 'taylor'")  # fmt: skip
    _fails(cli(*base[:2], "--data", str(short), *base[2:], "--resume"), "no partial run")
    _fails(cli("score", ckpt, "--data", str(short), "--samples", "1", "--seq-len", "4",
               "--out", str(scored / "ref")), "already exists")  # fmt: skip
    assert not (tmp_path / "s").exists()
