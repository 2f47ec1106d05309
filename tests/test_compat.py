"""megatron-core versions: the supported range (0.12.0 - 0.16.x) passes the check and others are
refused before any work; the version-keyed helpers agree with megatron-core where it has its own;
and (when ``MEGATRON_PRUNE_OTHER_PYTHON`` names another virtualenv's interpreter, as
``make test-mc012`` does) checkpoints written under one version load under the other."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from megatron_prune import compat
from megatron_prune.errors import UserError

OTHER_PYTHON_ENV = "MEGATRON_PRUNE_OTHER_PYTHON"


def test_the_installed_megatron_core_passes():
    assert compat.is_supported(compat.megatron_core_version())
    compat.check_megatron_core()


@pytest.mark.parametrize("version", ["0.12.0", "0.12.3", "0.13.1", "0.15.0rc2", "0.16.1"])
def test_every_release_in_the_range_passes(monkeypatch, version):
    monkeypatch.setattr(compat, "megatron_core_version", lambda: version)
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    compat.check_megatron_core()


@pytest.mark.parametrize("version", ["0.11.0", "0.17.0", "1.0.0", "unknown"])
def test_a_release_outside_the_range_is_refused(monkeypatch, version):
    monkeypatch.setattr(compat, "megatron_core_version", lambda: version)
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    with pytest.raises(UserError, match=rf"megatron-core {version} .* 0\.12\.0 - 0\.16\.x"):
        compat.check_megatron_core()
    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    compat.check_megatron_core()  # the user's explicit choice


def test_versions_parse_with_pre_release_and_local_tags():
    assert compat.parse_version("0.12.3") == (0, 12, 3)
    assert compat.parse_version("0.13.0rc2") == (0, 13, 0)
    assert compat.parse_version("0.16.1+cu128") == (0, 16, 1)
    assert compat.parse_version("0.14") == (0, 14, 0)
    assert compat.parse_version("main") is None


@pytest.mark.parametrize(
    "window, pattern",
    [(None, None), ((511, 0), None), ((511, 0), 6), ((511, 0), [1, 1, 0, 1, 0, 0, 1, 1, 1, 1])],
)
def test_our_window_rule_equals_megatron_cores(monkeypatch, window, pattern):
    """Before 0.15 compat decides which layers are windowed itself: by megatron-core's rule,
    checked here against megatron-core's own function where it has one."""
    if not compat.since(15):
        pytest.skip("megatron-core before 0.15 has no is_layer_window_attention to compare with")
    from megatron.core.transformer.utils import is_layer_window_attention as megatrons

    expected = [megatrons(window, pattern, n) for n in range(1, 11)]
    monkeypatch.setattr(compat, "since", lambda minor: False)  # take the pre-0.15 branch
    assert [compat.is_layer_window_attention(window, pattern, n) for n in range(1, 11)] == expected


def test_a_config_keeps_the_window_pattern_on_every_version():
    """window_attn_skip_freq is a TransformerConfig field from 0.15 on and an attribute before;
    either way the config carries it, and a per-layer copy rebuilt from it too."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = compat.make_config(
        TransformerConfig, num_layers=4, hidden_size=64, num_attention_heads=4,
        window_size=(7, 0), window_attn_skip_freq=[1, 0, 1, 0],
    )  # fmt: skip
    assert config.window_attn_skip_freq == [1, 0, 1, 0]
    values = compat.config_values(config, TransformerConfig)
    copy = compat.make_config(TransformerConfig, **{**values, "num_attention_heads": 2})
    assert copy.window_attn_skip_freq == [1, 0, 1, 0] and copy.num_attention_heads == 2


def test_the_optimizer_format_is_one_the_release_has():
    from megatron.core.optimizer import distrib_optimizer

    source = Path(distrib_optimizer.__file__).read_text()
    assert f"'{compat.optimizer_sharding_type()}'" in source


@pytest.mark.skipif(
    not os.environ.get(OTHER_PYTHON_ENV),
    reason=f"{OTHER_PYTHON_ENV} names no other virtualenv (make test-mc012 sets it)",
)
def test_checkpoints_load_across_megatron_core_versions(tmp_path):
    """Gemma 3 (sliding-window and global layers, sandwich norms): written at TP=2 under this
    megatron-core, read at PP=2 x VPP=2 under the other one with the same logits, and back."""
    from tests.helpers import torchrun
    from tests.tiny_models import make_hf_model, save_hf_model

    other = os.environ[OTHER_PYTHON_ENV]
    src = save_hf_model(make_hf_model("gemma3", seed=3), tmp_path / "hf")
    tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")

    def side(python: str, name: str, read: dict | None, write: dict | None) -> dict:
        spec = {"tokens": str(tmp_path / "tokens.pt"), "report": str(tmp_path / f"{name}.json"),
                "read": read, "write": write}  # fmt: skip
        (tmp_path / f"{name}.spec.json").write_text(json.dumps(spec))
        torchrun("cross_version.py", 2, str(tmp_path / f"{name}.spec.json"), python=python)
        return json.loads((tmp_path / f"{name}.json").read_text())

    def written(name: str) -> dict:
        return {"src": str(src), "ckpt": str(tmp_path / name), "layout": {"tp": 2},
                "logits": str(tmp_path / f"{name}.pt")}  # fmt: skip

    def read(name: str) -> dict:
        return {"ckpt": str(tmp_path / name), "layout": {"pp": 2, "vpp": 2},
                "logits": str(tmp_path / f"{name}.pt")}  # fmt: skip

    here = side(sys.executable, "here", None, written("ckpt_here"))
    there = side(other, "there", read("ckpt_here"), written("ckpt_there"))
    back = side(sys.executable, "back", read("ckpt_there"), None)
    assert here["megatron_core"] != there["megatron_core"], "the other python has the same version"
    assert there["max_diff"] <= 1e-4, f"{here['megatron_core']} -> {there['megatron_core']}"
    assert back["max_diff"] <= 1e-4, f"{there['megatron_core']} -> {back['megatron_core']}"
