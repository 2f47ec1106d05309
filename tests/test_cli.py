"""The command line as a user drives it: conversions through torchrun re-launch, resharding,
HF export that transformers loads, and bad input that fails early and cleanly."""

import pytest
import torch

from tests.helpers import cli
from tests.tiny_models import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = make_hf_model("qwen2", seed=3)
    return model, save_hf_model(model, tmp / "hf"), tmp


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_convert_reshard_export_round_trip(tiny):
    import transformers

    model, hf_dir, tmp = tiny
    before = _snapshot(hf_dir)
    r = cli("convert", str(hf_dir), str(tmp / "tp2"), "--tp", "2")
    assert r.returncode == 0, r.stderr
    r = cli("convert", str(tmp / "tp2"), str(tmp / "pp2"), "--pp", "2")
    assert r.returncode == 0, r.stderr
    r = cli("convert", str(tmp / "pp2"), str(tmp / "hf_out"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert _snapshot(hf_dir) == before  # the source is never touched
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp / "hf_out"), attn_implementation="eager"
    ).eval()
    original, exported = model.state_dict(), back.state_dict()
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    tokens = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)
    assert not list(tmp.glob("*.partial"))


def _fails(result, *needles):
    assert result.returncode != 0
    for needle in needles:
        assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_source(tmp_path):
    _fails(cli("convert", f"gguf:{tmp_path}/nope.gguf", str(tmp_path / "o")), "does not exist")
    _fails(cli("convert", str(tmp_path / "nope"), str(tmp_path / "o")), "does not exist")
    assert not (tmp_path / "o").exists()


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _fails(cli("convert", f"gguf:{path}", str(tmp_path / "o")), "'mamba' is not supported")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp", "3"], "TP=3 does not divide num_attention_heads=4 (valid TP: [1, 2, 4])"),
        (["--tp", "8"], "TP=8 does not divide num_query_groups=2"),
        (["--pp", "8"], "PP=8 needs at least 8 layers, the model has 4"),
        (["--pp", "3"], "PP=3 does not divide num_layers=4"),
    ],
)
def test_bad_layouts_fail_before_any_work(tiny, tmp_path, flags, message):
    _, hf_dir, _ = tiny
    _fails(cli("convert", str(hf_dir), str(tmp_path / "o"), *flags), message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_existing_destination_needs_overwrite(tiny, tmp_path):
    _, hf_dir, _ = tiny
    dst = tmp_path / "o"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    _fails(cli("convert", str(hf_dir), str(dst)), "already exists; pass --overwrite")
    assert (dst / "keep.txt").read_text() == "mine"


def test_truncated_checkpoint(tiny, tmp_path):
    _, hf_dir, _ = tiny
    ckpt = tmp_path / "ck"
    assert cli("convert", str(hf_dir), str(ckpt)).returncode == 0
    shard = max(ckpt.rglob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _fails(cli("convert", str(ckpt), str(tmp_path / "o")), "truncated or damaged")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    (ckpt / "megatron_prune.json").unlink()
    (ckpt / "latest_checkpointed_iteration.txt").unlink()  # not a Megatron-LM folder either
    _fails(cli("eval", "ppl", str(ckpt), "--data", str(shard)), "not a checkpoint written by")
