"""``bench``: named shapes and arch files, FLOPs equal to the plan cost model's, the record's
arithmetic (tokens/s, TFLOP/s, MFU, ratios against the first model), the CLI on a checkpoint and
a pruned shape, KV-cache decode equal to full forwards at TP=2, a PP=2 run, refusals. No test
asserts a timing."""

import json
import math

import pytest
import yaml

from megatron_prune.bench import flops
from megatron_prune.bench.peaks import peak_tflops
from megatron_prune.bench.report import SCHEMA, add_comparison, phase_record
from megatron_prune.checkpoint.metadata import CheckpointMeta
from megatron_prune.cli import main
from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch
from megatron_prune.models.shapes import SHAPES, load_shape
from megatron_prune.plan import cost
from tests.helpers import cli, torchrun

TINY = ModelArch(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=256,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=250,
                 max_position_embeddings=128, tie_embeddings=True)  # fmt: skip
PHASES = ("prefill", "decode", "train")


def test_named_shapes_have_the_published_parameter_counts():
    # Hugging Face model cards / safetensors totals of the real models
    published = {"smollm2-135m": 134_515_008, "gemma3-270m": 268_098_176,
                 "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
                 "llama-3.1-8b": 8_030_261_248, "minitron-4b-width": 4.51e9,
                 "minitron-4b-depth": 4.54e9}  # fmt: skip
    assert set(published) <= set(SHAPES)
    for name, params in published.items():
        assert cost.model_params(load_shape(name)) == pytest.approx(params, rel=2e-3), name
    # the two Minitron students are the 8B model pruned in width and in depth
    big, width, depth = (SHAPES[n] for n in ("llama-3.1-8b", "minitron-4b-width",
                                             "minitron-4b-depth"))  # fmt: skip
    assert (width.num_layers, width.hidden_size) == (big.num_layers, 3072)
    assert (depth.num_layers, depth.hidden_size) == (big.num_layers // 2, big.hidden_size)


def test_arch_files_load_and_unknown_shapes_are_refused(tmp_path):
    plain = tmp_path / "arch.yaml"
    plain.write_text(yaml.safe_dump({**TINY.to_dict(), "layer_ffn_hidden_size": [256, 64] * 2}))
    assert load_shape(plain).widths(1).ffn_hidden_size == 64
    wrapped = tmp_path / "megatron_prune.json"  # a checkpoint's metadata file: {"arch": {...}}
    wrapped.write_text(json.dumps({"arch": TINY.to_dict(), "layout": {}}))
    assert load_shape(wrapped) == TINY
    with pytest.raises(UserError, match="neither a known shape"):
        load_shape("llama-9000")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY.to_dict(), "num_query_groups": 3}))
    with pytest.raises(UserError, match="bad.yaml: num_attention_heads=4 is not a multiple"):
        load_shape(bad)


def test_flops_per_token_are_the_plan_cost_models():
    s = 96
    assert flops.prefill_flops_per_token(TINY, s) == cost.model_flops(TINY, s)
    assert flops.train_flops_per_token(TINY, s) == 3 * cost.model_flops(TINY, s)
    # decoding positions 96, 97, 98 attends 97, 98, 99 keys: the mean of the three counts
    by_hand = sum(cost.model_flops(TINY, k) for k in (97, 98, 99)) / 3
    assert flops.decode_flops_per_token(TINY, s, 3) == pytest.approx(by_hand)
    attention = 4 * TINY.num_attention_heads * TINY.head_dim * TINY.num_layers
    assert cost.model_flops(TINY, 98) - cost.model_flops(TINY, 97) == attention


def test_peaks_and_mfu():
    assert peak_tflops("NVIDIA H200", __import__("torch").bfloat16) == 989.0
    assert peak_tflops("NVIDIA H100 PCIe", __import__("torch").bfloat16) == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", __import__("torch").float16) == 312.0
    assert peak_tflops("NVIDIA H200", __import__("torch").float32) is None  # no fp32 table
    assert peak_tflops("cpu", __import__("torch").bfloat16) is None
    rec = phase_record(2.0, 8000, 1e12, world_size=2, peak=1000.0)
    assert rec["tokens_per_s"] == 4000 and rec["tflops"] == 4000
    assert rec["mfu"] == pytest.approx(2.0)  # 4000 TFLOP/s over 2 x 1000


def _check_record(rec: dict, arch: ModelArch, b: int, s: int, n: int, peak: float | None):
    assert rec["schema"] == SCHEMA and ModelArch.from_dict(rec["arch"]) == arch
    assert rec["params"] == cost.model_params(arch)
    assert rec["block_params"] == cost.block_params(arch)
    expected = {"prefill": (b * s, flops.prefill_flops_per_token(arch, s)),
                "decode": (b * n, flops.decode_flops_per_token(arch, s, n)),
                "train": (b * s, flops.train_flops_per_token(arch, s))}  # fmt: skip
    for phase, (tokens, per_token) in expected.items():
        p = rec[phase]
        assert p["tokens"] == tokens and p["flops_per_token"] == pytest.approx(per_token)
        assert p["seconds"] > 0
        assert p["tokens_per_s"] == pytest.approx(tokens / p["seconds"])
        assert p["tflops"] == pytest.approx(p["tokens_per_s"] * per_token / 1e12)
        if peak is None:
            assert p["mfu"] is None
        else:
            assert p["mfu"] == pytest.approx(p["tflops"] / peak)
    assert "kv_cache" in rec["decode"]["method"] and "megatron-core" in rec["train"]["optimizer"]
    layers = sorted(i for group in rec["layers"] for i in group["layers"])
    assert layers == list(range(arch.num_layers))
    assert sorted(map(int, rec["layer_forward_ms"])) == layers
    for group in rec["layers"]:
        w = arch.widths(group["layers"][0])
        assert group["ffn_hidden_size"] == w.ffn_hidden_size and group["forward_ms"] > 0


def test_cli_bench_a_checkpoint_against_a_pruned_shape(tmp_path):
    from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

    folder = save_hf_model(make_hf_model("llama", seed=2), tmp_path / "hf")
    save_word_tokenizer(folder, "the cat sat on the mat and the dog sat too")
    ckpt = tmp_path / "ckpt"
    assert cli("convert", str(folder), str(ckpt)).returncode == 0
    dense = CheckpointMeta.read(ckpt).arch
    pruned = ModelArch.from_dict({**dense.to_dict(), "layer_ffn_hidden_size": [64, 32, 64, 32]})
    (tmp_path / "pruned.yaml").write_text(yaml.safe_dump(pruned.to_dict()))
    out = tmp_path / "bench.jsonl"
    b, s, n = 2, 16, 3
    proc = cli("bench", str(ckpt), "--shape", str(tmp_path / "pruned.yaml"), "--batch-size",
               str(b), "--seq-len", str(s), "--decode-tokens", str(n), "--warmup", "1",
               "--iters", "2", "--peak-tflops", "0.5", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines == [json.loads(x) for x in out.read_text().splitlines()]
    ref, small = lines
    assert (ref["source"], small["source"]) == ("checkpoint", "shape")
    _check_record(ref, dense, b, s, n, peak=0.5)
    _check_record(small, pruned, b, s, n, peak=0.5)
    assert ref["device"] == "cpu" and ref["dtype"] == "float32"  # CPU default: fp32
    for rec in lines:
        assert rec["reference"] == str(ckpt)
        cmp = rec["vs_reference"]
        assert cmp["param_ratio"] == pytest.approx(ref["block_params"] / rec["block_params"])
        for phase in PHASES:
            speedup = rec[phase]["tokens_per_s"] / ref[phase]["tokens_per_s"]
            assert cmp[f"{phase}_speedup"] == pytest.approx(speedup)
            assert cmp[f"{phase}_speedup_per_param"] == pytest.approx(speedup / cmp["param_ratio"])
    assert ref["vs_reference"]["prefill_speedup"] == 1.0
    assert small["vs_reference"]["param_ratio"] > 1.3  # the pruned FFNs: fewer parameters
    table = [row for row in proc.stderr.splitlines() if row.startswith("| ")]
    assert len(table) == 3 and str(ckpt) in table[1] and "pruned.yaml" in table[2]
    assert f"{small['vs_reference']['param_ratio']:.2f}" in table[2]


def test_decode_matches_full_forwards_at_tp2_and_a_pp2_run(tmp_path):
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(TINY.to_dict()))
    torchrun("bench_checks.py", 2, str(tmp_path), str(tmp_path / "arch.yaml"))
    report = json.loads((tmp_path / "report.json").read_text())
    diffs = report["decode_max_abs_diff"]
    for family in ("llama", "gemma3"):
        assert diffs[f"{family}_scale"] > 0.01  # logits that are not all zero
        assert diffs[family] < 1e-5, diffs
    rec = report["pp2"]
    assert rec["layout"]["pp"] == 2 and rec["world_size"] == 2
    assert "PP > 1" in rec["decode"]["skipped"]
    assert sorted(map(int, rec["layer_forward_ms"])) == list(range(TINY.num_layers))
    assert rec["train"]["tokens"] == 2 * 16 and math.isfinite(rec["train"]["tokens_per_s"])
    assert rec["vs_reference"]["param_ratio"] == 1.0


def _refusal(capsys, *args: str) -> str:
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    assert "neither a known shape" in _refusal(capsys, "--shape", "llama-9000")
    assert "smollm2-135m" in _refusal(capsys, "--shape", "nope")  # the names it knows
    missing = str(tmp_path / "missing")
    assert f"{missing} is not a directory" in _refusal(capsys, missing)
    assert "nothing to benchmark" in _refusal(capsys)
    assert "--phases" in _refusal(capsys, "--shape", "smollm2-135m", "--phases", "prefil")
    assert "TP=2 does not divide" in _refusal(capsys, "--shape", "smollm2-135m", "--tp", "2")
    assert "--iters must be >= 1" in _refusal(capsys, "--shape", "smollm2-135m", "--iters", "0")


def test_ratios_are_against_the_first_model():
    recs = [{"model": "dense", "block_params": 100, "prefill": {"tokens_per_s": 10.0}},
            {"model": "half", "block_params": 50, "prefill": {"tokens_per_s": 15.0},
             "decode": {"skipped": "why"}}]  # fmt: skip
    add_comparison(recs, PHASES)
    assert recs[1]["vs_reference"] == {"param_ratio": 2.0, "prefill_speedup": 1.5,
                                       "prefill_speedup_per_param": 0.75}  # fmt: skip
    assert recs[0]["vs_reference"]["prefill_speedup_per_param"] == 1.0
    assert all(r["reference"] == "dense" for r in recs)
