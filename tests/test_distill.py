"""Distillation end to end through the CLI on tiny models (CPU, gloo): the same three steps at
every layout, exact resume after a kill, the LM-only baseline with TensorBoard and wandb
(offline) logging, indexed-dataset building, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, _env, cli, last_json

STEPS_3 = ["--train-tokens", "384", "--seq-len", "32", "--global-batch", "4",
           "--temperature", "2", "--lm-weight", "0.25", "--lr", "1e-3"]  # fmt: skip
LAYOUTS = {
    "tp2": ["--tp", "2"],
    "tp2_sp": ["--tp", "2", "--sequence-parallel"],
    "pp2": ["--pp", "2"],
    "pp2_vpp2": ["--pp", "2", "--vpp", "2"],
    "dp2": ["--nproc-per-node", "2"],
    "dp2_distributed_optimizer": ["--nproc-per-node", "2", "--distributed-optimizer"],
    # activation recomputation changes memory, never the numbers
    "recompute_full": ["--recompute-granularity", "full"],
    "tp2_recompute_selective": ["--tp", "2", "--recompute-granularity", "selective"],
}


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def models(tmp_path_factory, austen_calibration_text, austen_eval_text):
    """A tiny Gemma 3 teacher, a narrower student with the same tokenizer, and training data."""
    from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

    tmp = tmp_path_factory.mktemp("distill")
    text = austen_calibration_text.read_text()[:200_000]
    (tmp / "train.txt").write_text(text)
    (tmp / "eval.txt").write_text(austen_eval_text.read_text()[:20_000])
    student_sizes = {"hidden_size": 48, "intermediate_size": 96}
    for name, seed, sizes in (("teacher", 3, {}), ("student", 4, student_sizes)):
        # Gemma 3: sandwich norms, QK-norm (TP-replicated weights), tied embeddings, BOS
        folder = save_hf_model(make_hf_model("gemma3", seed=seed, **sizes), tmp / f"{name}_hf")
        save_word_tokenizer(folder, text)
        _ok(cli("convert", str(folder), str(tmp / name)))
    built = _ok(cli("data", "build", "--tokenizer", str(tmp / "teacher"), "--input",
                    str(tmp / "train.txt"), "--output", str(tmp / "data" / "train")))  # fmt: skip
    return {"tmp": tmp, "build": last_json(built.stdout)}


def _distill(models, out, *extra: str, teacher: bool = True) -> subprocess.CompletedProcess:
    tmp = models["tmp"]
    args = ["distill", "--student", str(tmp / "student"), "--data", str(tmp / "data" / "train"),
            "--out", str(out)]  # fmt: skip
    if teacher:
        args += ["--teacher", str(tmp / "teacher")]
    return cli(*args, *extra)


@pytest.fixture(scope="module")
def layout_runs(models):
    tmp = models["tmp"]
    runs = {}
    reference = _ok(_distill(models, tmp / "run_tp1", *STEPS_3, "--eval-data",
                             str(tmp / "eval.txt"), "--eval-tokens", "512"))  # fmt: skip
    runs["tp1"] = _metrics(tmp / "run_tp1")
    runs["tp1_final"] = last_json(reference.stdout)
    for name, layout in LAYOUTS.items():
        _ok(_distill(models, tmp / f"run_{name}", *STEPS_3, *layout))
        runs[name] = _metrics(tmp / f"run_{name}")
    return runs


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_same_losses_and_grad_norms_at_every_layout(layout_runs, layout):
    reference, got = layout_runs["tp1"], layout_runs[layout]
    assert [r["step"] for r in got] == [1, 2, 3]
    for ref, rec in zip(reference, got, strict=True):
        for key in ("loss", "kl", "ce", "grad_norm", "lr"):
            assert abs(rec[key] - ref[key]) <= 1e-5 * abs(ref[key]), (layout, key, rec, ref)


def test_distillation_lowers_the_loss(layout_runs):
    losses = [r["loss"] for r in layout_runs["tp1"]]
    assert losses[-1] < losses[0]


def test_distilled_student_is_a_checkpoint_eval_accepts(models, layout_runs):
    tmp = models["tmp"]
    result = _ok(cli("eval", "ppl", str(tmp / "run_tp1" / "student"), "--data",
                     str(tmp / "eval.txt"), "--seq-len", "32", "--max-tokens", "512"))  # fmt: skip
    ppl = last_json(result.stdout)["ppl"]
    assert abs(ppl - layout_runs["tp1_final"]["eval_ppl"]) <= 1e-6 * ppl


BF16_LAYOUTS = {
    "tp1": [],
    "tp2": ["--tp", "2"],
    "pp2": ["--pp", "2"],
    "dp2_distributed_optimizer": ["--nproc-per-node", "2", "--distributed-optimizer"],
}
BF16_TOLERANCE = 1e-2  # relative, between layouts of one bf16 run


@pytest.fixture(scope="module")
def bf16_runs(models):
    """Three bf16 steps (bf16 student in Float16Module, fp32 main parameters in Megatron's
    optimizer, bf16 teacher) at several layouts; TP=1 also evaluates and saves each step."""
    tmp = models["tmp"]
    runs = {}
    for name, layout in BF16_LAYOUTS.items():
        extra = []
        if name == "tp1":
            extra = ["--eval-data", str(tmp / "eval.txt"), "--eval-tokens", "512",
                     "--save-interval", "1", "--keep-checkpoints", "3"]  # fmt: skip
        _ok(_distill(models, tmp / f"bf16_{name}", *STEPS_3, "--bf16", *layout, *extra))
        runs[name] = _metrics(tmp / f"bf16_{name}")
    return runs


@pytest.mark.parametrize("layout", [name for name in BF16_LAYOUTS if name != "tp1"])
def test_bf16_distillation_is_the_same_at_every_layout(bf16_runs, layout):
    reference, got = bf16_runs["tp1"], bf16_runs[layout]
    assert [r["step"] for r in got] == [1, 2, 3]
    for ref, rec in zip(reference, got, strict=True):
        for key in ("loss", "kl", "ce", "grad_norm"):
            assert abs(rec[key] - ref[key]) <= BF16_TOLERANCE * abs(ref[key]), (layout, key)


def test_bf16_distillation_tracks_fp32(bf16_runs, layout_runs):
    """Same data, same steps: bf16 losses stay within a few percent of fp32's, and they are
    not the fp32 numbers (the run really computed in bf16)."""
    for ref, rec in zip(layout_runs["tp1"], bf16_runs["tp1"], strict=True):
        assert abs(rec["loss"] - ref["loss"]) <= 5e-2 * ref["loss"], (rec, ref)
    pairs = zip(layout_runs["tp1"], bf16_runs["tp1"], strict=True)
    assert any(r["loss"] != f["loss"] for r, f in pairs)


def test_fp16_distillation_with_dynamic_loss_scaling_tracks_fp32(models, layout_runs):
    """fp16 student, megatron-core's dynamic loss scale (the schedules scale the loss, the
    optimizer unscales the gradients): every step is taken and tracks fp32."""
    out = models["tmp"] / "fp16_tp1"
    _ok(_distill(models, out, *STEPS_3, "--fp16", "--initial-loss-scale", "4096"))
    for ref, rec in zip(layout_runs["tp1"], _metrics(out), strict=True):
        assert math.isfinite(rec["grad_norm"]), rec  # NaN: a step skipped for overflow
        for key in ("loss", "grad_norm"):
            assert abs(rec[key] - ref[key]) <= 5e-2 * abs(ref[key]), (key, rec, ref)


def test_bf16_student_records_its_dtype_and_loads_in_eval(models, bf16_runs):
    tmp = models["tmp"]
    student = tmp / "bf16_tp1" / "student"
    assert json.loads((student / "megatron_prune.json").read_text())["dtype"] == "bf16"
    ppl_of = {}
    for precision in ("--bf16", "--fp32"):
        result = _ok(cli("eval", "ppl", str(student), "--data", str(tmp / "eval.txt"),
                         "--seq-len", "32", "--max-tokens", "512", precision))  # fmt: skip
        ppl_of[precision] = last_json(result.stdout)["ppl"]
    # the run's own held-out number was computed in bf16 on the same weights
    assert abs(ppl_of["--bf16"] - bf16_runs["tp1"][-1]["eval_ppl"]) <= 1e-6 * ppl_of["--bf16"]
    assert abs(ppl_of["--fp32"] - ppl_of["--bf16"]) <= 2e-2 * ppl_of["--bf16"]


def test_bf16_resume_from_a_checkpoint_repeats_the_last_step(models, bf16_runs, tmp_path):
    """Resuming the bf16 run from its step-2 checkpoint (fp32 main parameters, loss state)
    gives step 3 exactly as the uninterrupted run did."""
    import shutil

    done = models["tmp"] / "bf16_tp1"
    resumed = tmp_path / "resumed"
    shutil.copytree(done, resumed)
    shutil.rmtree(resumed / "student")
    shutil.rmtree(resumed / "checkpoints" / "step_0000003")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")
    _ok(_distill(models, resumed, *STEPS_3, "--bf16", "--save-interval", "1", "--resume"))
    after = _metrics(resumed)
    assert [r["step"] for r in after] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        assert after[2][key] == bf16_runs["tp1"][2][key], key


def test_kill_and_resume_gives_the_uninterrupted_curve(models, tmp_path):
    """SIGKILL the whole job once step 3's checkpoint exists, resume, compare every step."""
    args = ["--train-tokens", str(12 * 128), "--seq-len", "32", "--global-batch", "4",
            "--lr", "1e-3", "--warmup-steps", "3", "--save-interval", "1",
            "--nproc-per-node", "2", "--distributed-optimizer"]  # fmt: skip
    _ok(_distill(models, tmp_path / "straight", *args))
    tmp = models["tmp"]
    cmd = [sys.executable, "-m", "megatron_prune.cli", "distill", "--teacher", str(tmp / "teacher"),
           "--student", str(tmp / "student"), "--data", str(tmp / "data" / "train"),
           "--out", str(tmp_path / "killed"), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    marker = tmp_path / "killed" / "checkpoints" / "step_0000003" / "trainer.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_metrics(tmp_path / "killed"))
    assert 3 <= killed_at < 12, "the job must die mid-run"
    assert not (tmp_path / "killed" / "student").exists()
    resumed = _ok(_distill(models, tmp_path / "killed", *args, "--resume"))
    assert "resumed from" in resumed.stderr
    straight, after = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert [r["step"] for r in after] == list(range(1, 13))
    for a, b in zip(straight, after, strict=True):
        for key in ("loss", "grad_norm", "lr"):
            assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (key, a, b)


def test_lm_only_training_logs_to_tensorboard_and_wandb(models, tmp_path):
    out = tmp_path / "lm"
    result = _ok(_distill(models, out, "--train-tokens", "256", "--seq-len", "32",
                          "--global-batch", "4", "--lm-weight", "1", "--tensorboard",
                          "--wandb-project", "tests", teacher=False))  # fmt: skip
    final = last_json(result.stdout)
    assert "ce" in final and "kl" not in final and final["steps"] == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "wandb").glob("offline-run-*"))


def test_data_build_round_trips_token_ids(models):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_prune.data.indexed import read_documents
    from megatron_prune.data.tokenizer import load_tokenizer

    tmp = models["tmp"]
    tokenizer = load_tokenizer(tmp / "teacher")
    docs = list(read_documents(tmp / "train.txt"))
    dataset = IndexedDataset(str(tmp / "data" / "train"))
    assert models["build"]["documents"] == len(docs) == len(dataset)
    for i in (0, len(docs) // 2, len(docs) - 1):
        assert dataset[i].tolist() == tokenizer.encode(docs[i]) + [tokenizer.eos_id]


def test_weighted_blend_draws_from_both_datasets(models, tmp_path):
    """``--data 0.75 A 0.25 B`` (a Megatron-LM blend) through megatron-core's GPTDataset."""
    import numpy
    import torch

    from megatron_prune.data.training import TokenizerView, build_train_dataset, parse_blend

    tmp = models["tmp"]
    _ok(cli("data", "build", "--tokenizer", str(tmp / "teacher"), "--input",
            str(tmp / "eval.txt"), "--output", str(tmp_path / "other")))  # fmt: skip
    a, b = str(tmp / "data" / "train"), str(tmp_path / "other")
    blend = parse_blend(["0.75", a, "0.25", b])
    assert blend == ([a, b], [0.75, 0.25])
    # the dataset builder is collective: a one-process group stands in for torchrun
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dataset = build_train_dataset(blend, samples=400, seq_len=16,
                                      tokenizer=TokenizerView(vocab_size=250, eod=2), seed=5,
                                      cache_dir=tmp_path / "cache")  # fmt: skip
        share_a = float(numpy.mean(numpy.asarray(dataset.dataset_index[:400]) == 0))
        assert 0.7 <= share_a <= 0.8, share_a
        assert dataset[0]["tokens"].shape == (16,)
    finally:
        torch.distributed.destroy_process_group()


def test_bad_distill_inputs(models, tmp_path, capsys):
    import shutil

    tmp = models["tmp"]
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tmp / "student", other)
    tok = other / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"the"', '"thee"', 1))
    base = ["--train-tokens", "128", "--seq-len", "32"]
    cases = [
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(other), "--data",
          str(tmp / "data" / "train"), "--out", str(tmp_path / "a"), *base],
         "do not share a tokenizer"),
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(tmp / "student"),
          "--data", str(tmp / "data" / "nothere"), "--out", str(tmp_path / "b"), *base],
         "not found: build it with"),
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(tmp / "student"),
          "--data", str(tmp / "data" / "train"), "--out", str(tmp_path / "c"), *base,
          "--global-batch", "3", "--nproc-per-node", "2"], "must be a multiple of"),
        (["distill", "--student", str(tmp / "student"), "--data", str(tmp / "data" / "train"),
          "--out", str(tmp_path / "d"), *base], "--lm-weight 1"),
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(tmp / "student"),
          "--data", str(tmp / "data" / "train"), "--out", str(tmp / "teacher_hf"), *base],
         "already exists"),
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(tmp / "student"),
          "--data", str(tmp / "data" / "train"), "--out", str(tmp / "teacher_hf"),
          "--overwrite", *base], "not a distill run folder"),
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(tmp / "student"),
          "--data", str(tmp / "data" / "train"), "--out", str(tmp / "data"), "--overwrite",
          *base], "contains the input --data"),
        (["distill", "--teacher", str(tmp / "teacher"), "--student", str(tmp / "student"),
          "--data", str(tmp / "data" / "train"), "--out", str(tmp / "student"), "--overwrite",
          *base], "is the input --student"),
    ]  # fmt: skip
    from megatron_prune.cli import main

    for args, message in cases:  # refused before any process is spawned: run in-process
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args


@pytest.mark.parametrize(
    "layout",
    [{"pp": 2, "vpp": 2}, pytest.param({"pp": 4}, marks=pytest.mark.slow)],  # 4 ranks: test-all
    ids=["pp2_vpp2", "pp4"],
)
def test_megatron_lm_trio_matches_the_distill_command(models, layout_runs, layout):
    """The provider / forward_step / loss trio, driven as Megatron-LM's pretrain() drives it
    (DDP around each pair, interleaved pipeline or four stages, chunks in the middle of the
    pipeline without data), computes the command's first step."""
    from tests.helpers import torchrun

    tmp = models["tmp"]
    name = "_".join(f"{k}{v}" for k, v in layout.items())
    spec = {"teacher": str(tmp / "teacher"), "student": str(tmp / "student"),
            "data": str(tmp / "data" / "train"), "layout": layout,
            "loss": {"temperature": 2.0, "lm_weight": 0.25},
            "out": str(tmp / f"trio_{name}.json")}  # fmt: skip
    (tmp / f"trio_spec_{name}.json").write_text(json.dumps(spec))
    ranks = layout["pp"]
    torchrun("megatron_lm_trio.py", ranks, str(tmp / f"trio_spec_{name}.json"))
    report, first = json.loads(Path(spec["out"]).read_text()), layout_runs["tp1"][0]
    assert not report["teacher_trainable"] and not report["checkpoint_holds_teacher"]
    assert not report["teacher_in_train_mode"]
    # the reporting (last) rank's middle chunk ran with data_iterator=None; at PP=4 ranks 1 and
    # 2 are middle stages, and the step could not finish had they failed to run
    assert report["middle_chunks"] == (1 if "vpp" in layout else 0)
    for key in ("loss", "grad_norm"):
        assert abs(report[key] - first[key]) <= 1e-5 * first[key], (key, report, first)


def test_mindspeed_llm_trio_matches_the_distill_command(models, layout_runs):
    """The same trio inside an imitation of MindSpeed-LLM v26.1.0's pretrain() (Megatron-LM
    core_v0.12's get_model and train_step: a provider without vp_stage, tuple loss reports, the
    --kd-* flags parsed before MindSpeed-LLM's own): three steps at PP=2 x VPP=2 log the
    command's loss, KL, CE, grad norm and learning rate at every step."""
    from tests.helpers import torchrun

    tmp = models["tmp"]
    spec = {"teacher": str(tmp / "teacher"), "student": str(tmp / "student"),
            "data": str(tmp / "data" / "train"), "layout": {"pp": 2, "vpp": 2},
            "loss": {"temperature": 2.0, "lm_weight": 0.25}, "steps": 3,
            "out": str(tmp / "mindspeed_trio.json")}  # fmt: skip
    (tmp / "mindspeed_trio_spec.json").write_text(json.dumps(spec))
    torchrun("mindspeed_llm_trio.py", 2, str(tmp / "mindspeed_trio_spec.json"))
    report = json.loads((tmp / "mindspeed_trio.json").read_text())
    # the last rank's chunks: a middle stage, then the last; built without vp_stage
    assert report["provider_calls"] == [[False, False], [False, True]]
    assert not report["teacher_trainable"] and not report["teacher_in_train_mode"]
    assert not report["checkpoint_holds_teacher"] and report["middle_chunks"] == 1
    assert report["sequence_parallel"] is False
    assert len(report["steps"]) == 3
    for got, ref in zip(report["steps"], layout_runs["tp1"], strict=True):
        for key in ("loss", "kl", "ce", "grad_norm", "lr"):
            assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), (key, got, ref)


@pytest.mark.slow  # about a minute; `make test-all`
def test_heterogeneous_student_distils_the_same_at_tp1_and_tp2(scored, tmp_path):
    """A student pruned to per-layer widths (megatron-core per-layer configs) trains like any
    other: the same two steps at TP=1 and TP=2."""
    target = tmp_path / "per_layer.yaml"
    target.write_text("hidden_size: 48\nffn_hidden_size: [96, 64, 128, 32]\n"
                      "num_attention_heads: [4, 2, 4, 2]\nnum_query_groups: 2\n")  # fmt: skip
    _ok(cli("prune", str(scored / "ckpt"), "--scores", str(scored / "ref"), "--target",
            str(target), "--out", str(tmp_path / "student")))  # fmt: skip
    _ok(cli("data", "build", "--tokenizer", str(scored / "ckpt"), "--input",
            str(scored / "calib.txt"), "--output", str(tmp_path / "data")))  # fmt: skip
    runs = {}
    for name, layout in (("tp1", []), ("tp2", ["--tp", "2"])):
        _ok(cli("distill", "--teacher", str(scored / "ckpt"), "--student",
                str(tmp_path / "student"), "--data", str(tmp_path / "data"),
                "--out", str(tmp_path / name),
                "--train-tokens", "256", "--seq-len", "32", "--global-batch", "4",
                "--lr", "1e-3", *layout))  # fmt: skip
        runs[name] = _metrics(tmp_path / name)
    assert len(runs["tp1"]) == 2
    for ref, rec in zip(runs["tp1"], runs["tp2"], strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(rec[key] - ref[key]) <= 1e-5 * abs(ref[key]), (key, rec, ref)
