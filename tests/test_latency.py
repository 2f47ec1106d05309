"""Latency budgets calibrated by ``bench`` timings (``plan --latency-table``): the fit recovers
a known cost model, falls back to fewer terms when the table has fewer shapes, a real CPU bench
table plans a budget that the fitted model says is met, and bad tables are refused in one line."""

import json

import pytest
import yaml

from megatron_prune.checkpoint.metadata import CheckpointMeta
from megatron_prune.models.arch import ModelArch
from megatron_prune.plan.cost import LayerShape, layer_flops, matmul_params
from megatron_prune.plan.latency import SCHEMA, fit_latency
from tests.helpers import cli

ARCH = ModelArch(family="llama", num_layers=4, hidden_size=64, ffn_hidden_size=256,
                 num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=250,
                 max_position_embeddings=128, tie_embeddings=True)  # fmt: skip
SEQ = 32


def _table(path, widths, ms_of):
    """A bench file with one record whose layer rows have the given (ffn, heads) widths."""
    rows = [{"hidden_size": 64, "ffn_hidden_size": f, "num_attention_heads": n,
             "num_query_groups": 2, "local": False, "layers": [i],
             "forward_ms": ms_of(LayerShape(64, f, n, 2))}
            for i, (f, n) in enumerate(widths)]  # fmt: skip
    record = {"schema": SCHEMA, "arch": ARCH.to_dict(), "seq_len": SEQ, "micro_batch_size": 1,
              "device": "test", "layers": rows}  # fmt: skip
    path.write_text(json.dumps(record) + "\n")
    return path


def test_fit_recovers_a_known_cost_model(tmp_path):
    def truth(s):
        return 0.5 + 2e-5 * matmul_params(ARCH, s) + 3e-4 * SEQ * s.heads * ARCH.head_dim

    widths = [(256, 4), (128, 4), (192, 2), (64, 2)]
    model = fit_latency(_table(tmp_path / "t.jsonl", widths, truth))
    assert model.form == "constant+matmul+attention"
    assert model.coefficients == pytest.approx((0.5, 2e-5, 3e-4), rel=1e-6)
    unseen = LayerShape(64, 96, 2, 2)
    assert model.layer_ms(ARCH, unseen) == pytest.approx(truth(unseen), rel=1e-6)
    assert model.max_rel_error < 1e-9


def test_fit_uses_fewer_terms_when_the_table_has_fewer_shapes(tmp_path):
    def flops_ms(s):
        return 1.0 + 1e-6 * layer_flops(ARCH, s, SEQ)

    two = fit_latency(_table(tmp_path / "two.jsonl", [(256, 4), (128, 4)], flops_ms))
    assert two.form == "constant+flops" and two.coefficients == pytest.approx((1.0, 1e-6))
    one = fit_latency(_table(tmp_path / "one.jsonl", [(256, 4)], flops_ms))
    assert one.form == "flops" and one.shapes == 1
    dense = LayerShape(64, 256, 4, 2)
    assert one.layer_ms(ARCH, dense) == pytest.approx(flops_ms(dense))  # exact where timed


@pytest.fixture(scope="module")
def bench_table(tmp_path_factory):
    """A real CPU bench table: the tiny dense model and a shape with four layer widths."""
    from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

    tmp = tmp_path_factory.mktemp("latency")
    folder = save_hf_model(make_hf_model("llama", seed=2), tmp / "hf")
    save_word_tokenizer(folder, "the cat sat on the mat and the dog sat too")
    ckpt = tmp / "ckpt"
    assert cli("convert", str(folder), str(ckpt)).returncode == 0
    dense = CheckpointMeta.read(ckpt).arch
    g = dense.num_query_groups
    shape = {**dense.to_dict(), "layer_ffn_hidden_size": [64, 32, 48, 16],
             "layer_num_attention_heads": [2 * g, 2 * g, g, g]}  # fmt: skip
    (tmp / "shape.yaml").write_text(yaml.safe_dump(ModelArch.from_dict(shape).to_dict()))
    table = tmp / "bench.jsonl"
    proc = cli("bench", str(ckpt), "--shape", str(tmp / "shape.yaml"), "--seq-len", "32",
               "--phases", "prefill", "--warmup", "1", "--iters", "3",
               "--out", str(table))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return ckpt, table


def test_a_real_bench_table_calibrates_a_latency_plan(bench_table, tmp_path):
    ckpt, table = bench_table
    # CPU timings of a tiny model carry a large fixed cost per layer (the fitted constant), so
    # aim between the cheapest layer the grid allows and the dense one, whatever the fit says
    model, arch = fit_latency(table), CheckpointMeta.read(ckpt).arch
    g = arch.num_query_groups
    dense = LayerShape(arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads, g)
    cheapest = model.layer_ms(arch, LayerShape(arch.hidden_size, 1, g, g))
    keep = round((1 + cheapest / model.layer_ms(arch, dense)) / 2, 2)
    out = tmp_path / "plan.yaml"
    proc = cli("plan", str(ckpt), "--budget", f"latency={keep}", "--latency-table", str(table),
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = yaml.safe_load(out.read_text())["plan"]
    cost_model = record["cost_model"]
    assert cost_model["latency_table"] == str(table) and cost_model["seq_len"] == 32
    assert cost_model["devices"] == ["cpu"] and cost_model["timed_shapes"] >= 4
    assert record["achieved"]["latency"] == pytest.approx(keep, rel=0.01)
    # the plan's latency fraction is the fitted model's, not the FLOPs proxy's
    assert json.dumps(model.record()["coefficients"]) == json.dumps(cost_model["coefficients"])
    analytic = cli("plan", str(ckpt), "--budget", f"latency={keep}", "--seq-len", "32",
                   "--out", str(tmp_path / "a.yaml"))  # fmt: skip
    assert analytic.returncode == 0, analytic.stderr
    flops_record = yaml.safe_load((tmp_path / "a.yaml").read_text())["plan"]
    assert flops_record["cost_model"].startswith("analytic")
    if model.form != "flops":  # a measured constant term: the same latency needs other widths
        assert record["achieved"]["flops"] != flops_record["achieved"]["flops"]


def test_bad_latency_tables_are_refused(bench_table, tmp_path):
    from megatron_prune import api
    from megatron_prune.errors import UserError

    ckpt, good = bench_table
    out = tmp_path / "plan.yaml"
    proc = cli("plan", str(ckpt), "--budget", "params=0.5", "--latency-table", str(good),
               "--out", str(out))  # as a user sees it
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "calibrates latency budgets" in lines[0], proc.stderr
    record = json.loads(good.read_text().splitlines()[0])
    (tmp_path / "bad.jsonl").write_text("prefill 12 ms\n")
    (tmp_path / "none.jsonl").write_text(json.dumps({**record, "layers": []}) + "\n")
    other = {**record, "seq_len": 64}
    (tmp_path / "mixed.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(other) + "\n")
    cases = [("missing.jsonl", "does not exist"), ("bad.jsonl", "is not JSON"),
             ("none.jsonl", "no layer timings"), ("mixed.jsonl", "mixes timings")]  # fmt: skip
    for name, message in cases:
        with pytest.raises(UserError, match=message):
            api.check_plan(ckpt, None, out, budget="latency=0.5",
                           latency_table=tmp_path / name)  # fmt: skip
    assert not out.exists()
