"""Unstructured sparsity (``sparsify``): the masks zero exactly what the methods say, the
per-layer ratios meet their mean, sparsity 0 changes nothing, the masked checkpoint is the same
written at TP=1, TP=2 and PP=2, it evaluates, and bad input is refused before any work."""

import numpy as np
import pytest
import torch

from megatron_prune.checkpoint.partial import open_reader
from megatron_prune.errors import UserError
from megatron_prune.surgery.masks import (
    LINEARS,
    layer_sparsities,
    magnitude_sparsify,
    wanda_sparsify,
)
from tests.helpers import cli


def test_magnitude_zeroes_the_smallest_entries_of_the_matrix():
    w = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    out = magnitude_sparsify(w, 0.7)
    zeroed = out == 0
    assert int(zeroed.sum()) == 84
    assert w.abs()[zeroed].max() <= w.abs()[~zeroed].min()  # least magnitudes, nothing else
    assert torch.equal(out[~zeroed], w[~zeroed])


def test_wanda_zeroes_per_output_row_by_weight_times_input_norm():
    g = torch.Generator().manual_seed(1)
    w, norms = torch.randn(6, 20, generator=g), torch.rand(20, generator=g) + 0.1
    out = wanda_sparsify(w, norms, 0.5)
    metric = w.abs() * norms
    for row in range(6):
        zeroed = out[row] == 0
        assert int(zeroed.sum()) == 10
        assert metric[row][zeroed].max() <= metric[row][~zeroed].min()
    # equal input norms: Wanda is per-row magnitude, not per-matrix magnitude
    flat = wanda_sparsify(w, torch.ones(20), 0.5)
    assert ((flat == 0).sum(1) == 10).all()
    assert not torch.equal(flat == 0, magnitude_sparsify(w, 0.5) == 0)


def test_alpha_sparsities_meet_the_mean_and_prune_heavy_tails_less():
    alphas = [2.0, 3.0, 5.0, 4.0]
    weights = [1.0, 1.0, 2.0, 1.0]
    s = layer_sparsities(4, 0.7, "alpha", alphas, 0.3, weights)
    assert np.average(s, weights=weights) == pytest.approx(0.7, abs=1e-9)
    assert s[0] < s[1] < s[3] < s[2]  # lower alpha (better trained): fewer weights removed
    assert all(0 <= x <= 1 for x in s)
    assert layer_sparsities(4, 0.7, "uniform") == [0.7] * 4
    with pytest.raises(UserError, match="--sparsity"):
        layer_sparsities(4, 1.0, "uniform")


def _tensors(ckpt):
    reader = open_reader(ckpt)
    return reader.read(sorted(reader.index))


@pytest.fixture(scope="module")
def masked(scored, tmp_path_factory):
    """The tiny Gemma 3 checkpoint, Wanda-masked with AlphaPruning ratios at three layouts."""
    tmp = tmp_path_factory.mktemp("sparsify")
    common = ["--scores", str(scored / "ref"), "--sparsity", "0.6", "--method", "wanda",
              "--allocation", "alpha"]  # fmt: skip
    for name, layout in (("tp1", []), ("tp2", ["--tp", "2"]), ("pp2", ["--pp", "2"])):
        r = cli("sparsify", str(scored / "ckpt"), "--out", str(tmp / name), *common, *layout)
        assert r.returncode == 0, r.stderr
    return tmp


def test_masked_checkpoint_is_the_same_at_every_layout(masked):
    ref = _tensors(masked / "tp1")
    for layout in ("tp2", "pp2"):
        other = _tensors(masked / layout)
        assert sorted(other) == sorted(ref)
        for name, t in ref.items():
            assert torch.equal(other[name], t), f"{name} differs at {layout}"


def test_masks_follow_the_plan_and_spare_everything_else(masked, scored):
    import json

    from megatron_prune.checkpoint.metadata import CheckpointMeta

    meta = CheckpointMeta.read(masked / "tp1")
    sparsities = meta.provenance["sparsity"]["layer_sparsities"]
    assert len(set(sparsities)) > 1  # alpha: not uniform
    dense, out = _tensors(scored / "ckpt"), _tensors(masked / "tp1")
    for name, t in out.items():
        prefix = "decoder.layers."
        if name.startswith(prefix) and name.split(".", 3)[3] in LINEARS.values():
            layer = int(name.split(".")[2])
            zero_rows = (t == 0).sum(-1).float() / t.shape[-1]
            assert torch.allclose(zero_rows, torch.tensor(sparsities[layer]), atol=1 / t.shape[-1])
            kept = t != 0
            assert torch.equal(t[kept], dense[name].float()[kept])
        else:
            assert torch.equal(t, dense[name].float()), name
    r = cli("eval", "ppl", str(masked / "tp1"), "--data", str(scored / "calib.txt"),
            "--seq-len", "24", "--max-tokens", "240")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert np.isfinite(json.loads(r.stdout.strip().splitlines()[-1])["ppl"])


def test_sparsity_zero_changes_nothing(scored, tmp_path):
    r = cli("sparsify", str(scored / "ckpt"), "--out", str(tmp_path / "same"), "--sparsity", "0",
            "--method", "magnitude")  # fmt: skip
    assert r.returncode == 0, r.stderr
    dense, out = _tensors(scored / "ckpt"), _tensors(tmp_path / "same")
    assert all(torch.equal(out[n], t.float()) for n, t in dense.items())


def test_bad_sparsify_inputs(scored, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from megatron_prune import api

    no_esd = tmp_path / "scores"
    shutil.copytree(scored / "ref", no_esd)
    table = load_file(str(no_esd / "scores.safetensors"))
    save_file({k: v for k, v in table.items() if not k.startswith(("esd/", "input_norm/"))},
              str(no_esd / "scores.safetensors"))  # fmt: skip
    ckpt, out = scored / "ckpt", tmp_path / "out"
    r = cli("sparsify", str(ckpt), "--out", str(out), "--sparsity", "0.5")  # as a user sees it
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs --scores DIR" in lines[0], r.stderr
    cases = [
        (dict(sparsity=1.5, method="magnitude"), "--sparsity 1.5"),
        (dict(sparsity=0.5, method="magnitude", allocation="alpha", scores=no_esd), "ESD alphas"),
        (dict(sparsity=0.5, scores=no_esd), "input_norm"),
        (dict(sparsity=0.5, method="top-k", scores=no_esd), "--method 'top-k'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            api.check_sparsify(ckpt, out, **kwargs)
    assert not out.exists()
