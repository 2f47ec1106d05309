"""Recipes and the report, as a user runs them: one tiny recipe chains every stage (convert ->
score -> plan -> prune -> data -> distill -> export -> eval -> report) into one folder with the
real commands; the report renders from it; a rerun skips every step; a changed input re-runs
the steps that read it and the report after them, and nothing else."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import cli
from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

RECIPE = """\
# megatron-prune run recipe.yaml --workdir WORK --set hf=... (tests/test_recipes.py)
vars:
  ckpt: ${workdir}/ckpt
  scores: ${workdir}/scores
  pruned: ${workdir}/pruned
  distilled: ${workdir}/distill
steps:
  - convert: {src: "${hf}", dst: "${ckpt}", overwrite: true}
  - score: {checkpoint: "${ckpt}", data: "${calib}", samples: 4, seq_len: 32, out: "${scores}",
            metrics: [channel, head, group, neuron, layer], overwrite: true}
  - plan: {checkpoint: "${ckpt}", scores: "${scores}", budget: "params=0.6",
           out: "${workdir}/plan.yaml", overwrite: true}
  - prune: {checkpoint: "${ckpt}", scores: "${scores}", target: "${workdir}/plan.yaml",
            out: "${pruned}", overwrite: true}
  - data: {action: build, tokenizer: "${ckpt}", input: "${calib}", output: "${workdir}/train",
           overwrite: true}
  - distill: {teacher: "${ckpt}", student: "${pruned}", data: "${workdir}/train",
              train_tokens: 256, seq_len: 32, global_batch: 4, eval_data: "${heldout_a}",
              eval_interval: 1, eval_tokens: 256, out: "${distilled}", overwrite: true}
  - convert: {src: "${distilled}/student", dst: "${workdir}/student_hf", to: hf,
              overwrite: true}
  - eval: {metric: ppl, checkpoint: "${ckpt}", data: "${heldout_b}", seq_len: 32,
           max_tokens: 512, out: "${workdir}/eval/base.json"}
  - eval: {metric: ppl, checkpoint: "${distilled}/student", data: "${heldout_b}", seq_len: 32,
           max_tokens: 512, out: "${workdir}/eval/distilled.json"}
  - report: {dirs: ["${workdir}"], out: "${workdir}/report", overwrite: true}
"""
STEPS = 10


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, austen_calibration_text, austen_eval_text):
    tmp = tmp_path_factory.mktemp("recipe")
    text = austen_calibration_text.read_text()[:60_000]
    held = austen_eval_text.read_text()
    (tmp / "calib.txt").write_text(text)
    (tmp / "heldout_a.txt").write_text(held[:5_000])
    (tmp / "heldout_b.txt").write_text(held[5_000:10_000])
    save_word_tokenizer(save_hf_model(make_hf_model("qwen2", seed=3), tmp / "hf"), text)
    (tmp / "recipe.yaml").write_text(RECIPE)
    sets = [f"hf={tmp / 'hf'}", f"calib={tmp / 'calib.txt'}",
            f"heldout_a={tmp / 'heldout_a.txt'}", f"heldout_b={tmp / 'heldout_b.txt'}"]
    args = ["run", str(tmp / "recipe.yaml"), "--workdir", str(tmp / "work")]
    for item in sets:
        args += ["--set", item]
    first = cli(*args)
    assert first.returncode == 0, first.stderr[-6000:]
    return tmp, args, first


def _ran(stderr: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+)/\d+ \((?!finished)", stderr)]


def _skipped(stderr: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+)/\d+ skipped", stderr)]


def _stats(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and ".stamps" not in p.parts}  # fmt: skip


def test_recipe_chains_every_stage_and_the_report_renders(recipe):
    tmp, _, first = recipe
    work = tmp / "work"
    assert _ran(first.stderr) == list(range(1, STEPS + 1)), first.stderr[-3000:]
    assert f"report: {work / 'report' / 'report.md'}" in first.stdout
    assert len(list((work / ".stamps" / "recipe").glob("*.json"))) == STEPS
    page = (work / "report" / "report.md").read_text()
    for section in ("## Perplexity vs parameters", "## Kept widths per layer",
                    "## Importance scores", "## Distillation", "## Plan", "## Missing"):
        assert section in page, section
    assert "Nothing: every section has data." in page
    pngs = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", page)
    assert "ppl_vs_params.png" in pngs and "widths_pruned.png" in pngs
    assert "distill_distill.png" in pngs and "scores_scores_neuron_l2.png" in pngs
    for name in pngs:  # every image the page shows exists and is a PNG
        data = (work / "report" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    # the perplexity table holds the two measured models, biggest first, with their results
    base = json.loads((work / "eval" / "base.json").read_text())
    distilled = json.loads((work / "eval" / "distilled.json").read_text())
    assert base["params"] > distilled["params"] > 0
    rows = [line for line in page.splitlines() if line.startswith("| ckpt |")
            or line.startswith("| distill/student |")]  # fmt: skip
    assert [r.split("|")[1].strip() for r in rows] == ["ckpt", "distill/student"]
    assert f"| {base['ppl']:.2f} |" in rows[0] and f"| {distilled['ppl']:.2f} |" in rows[1]
    # the held-out curve: one perplexity per distillation step (eval_interval 1, 2 steps)
    lines = (work / "distill" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics if "eval_ppl" in m] == [1, 2]
    assert f"| held-out perplexity | {metrics[0]['eval_ppl']:.2f} |" in page
    plan = (work / "plan.yaml").read_text()
    assert "strategy uniform, budget params=0.6" in page and plan.splitlines()[0] in page
    assert (work / "student_hf" / "config.json").is_file()


def test_rerun_of_a_finished_recipe_skips_every_step(recipe):
    tmp, args, first = recipe
    before = _stats(tmp / "work")
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _skipped(again.stderr) == list(range(1, STEPS + 1)) and _ran(again.stderr) == []
    assert _stats(tmp / "work") == before  # nothing was rewritten
    # what the steps printed is replayed: the perplexities and where the report is
    printed = [line for line in first.stdout.splitlines() if line.startswith("{")]
    assert printed and all(line in again.stdout for line in printed)
    assert f"report: {tmp / 'work' / 'report' / 'report.md'}" in again.stdout


def test_a_changed_input_reruns_what_reads_it_and_its_dependants(recipe, capsys):
    from megatron_prune.cli import main

    tmp, args, _ = recipe
    work = tmp / "work"
    old = json.loads((work / "eval" / "base.json").read_text())
    held = (tmp / "heldout_b.txt").read_text()
    (tmp / "heldout_b.txt").write_text(held[2_500:] + held[:2_500])  # other tokens first
    assert main([*args, "--dry-run"]) == 0  # judged in this process: no step is started
    dry = capsys.readouterr().err
    assert _ran(dry) == [8, 9, 10], dry[-3000:]
    assert "heldout_b.txt changed" in dry and "rewritten by step 8" in dry
    assert json.loads((work / "eval" / "base.json").read_text()) == old  # a dry run runs nothing
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _ran(again.stderr) == [8, 9, 10] and _skipped(again.stderr) == list(range(1, 8))
    new = json.loads((work / "eval" / "base.json").read_text())
    assert new["ppl"] != old["ppl"]
    assert f"| {new['ppl']:.2f} |" in (work / "report" / "report.md").read_text()


def test_report_of_a_partial_run_says_what_is_missing(recipe, tmp_path):
    from megatron_prune import api

    work = recipe[0] / "work"
    path = api.report([work / "scores", work / "plan.yaml"], tmp_path / "partial")
    page = path.read_text()
    assert "## Importance scores" in page and "## Plan" in page
    assert "## Perplexity vs parameters" not in page and "## Distillation" not in page
    missing = page[page.index("## Missing"):]
    for needle in ("perplexities", "distillation curves", "kept widths"):
        assert needle in missing, needle
    assert not (tmp_path / "partial.partial").exists()


def test_report_refuses_bad_input(tmp_path, capsys):
    from megatron_prune.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "out").mkdir()
    cases = [
        (["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], "does not exist"),
        (["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")],
         "found no megatron-prune outputs"),
        (["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")], "--overwrite"),
    ]  # fmt: skip
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "r").exists()


def test_stamps_fingerprint_content_and_folders(tmp_path):
    import os

    from megatron_prune.recipe import stamps

    text = tmp_path / "a.txt"
    text.write_text("one")
    first = stamps.fingerprint(text)
    os.utime(text, ns=(1, 1))
    assert stamps.fingerprint(text) == first  # same bytes, new time: unchanged
    text.write_text("two")
    assert stamps.fingerprint(text) != first
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.bin").write_bytes(b"x")
    seen = stamps.fingerprint(folder)
    (folder / "sub.partial").mkdir()  # scratch of a running writer does not count
    (folder / "report").mkdir()
    (folder / "report" / "report.md").write_text("r")
    assert stamps.fingerprint(folder, exclude=(folder / "report",)) == seen
    assert stamps.fingerprint(folder) != seen
    (folder / "sub" / "x.bin").write_bytes(b"xy")
    assert stamps.fingerprint(folder, exclude=(folder / "report",)) != seen
    assert stamps.fingerprint(tmp_path / "none") == "missing"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("step:\n  - convert: {src: a, dst: b}\n", "unknown key in recipe"),
        ("steps:\n  - convert: {src: a, dst: b, overwirte: true}\n", "did you mean 'overwrite'"),
        ("steps:\n  - convert: {src: a, dst: b\n", "YAML syntax error at line"),
        ("steps:\n  - convert: {src: a, dst: '${here}'}\n", "the recipe"),
    ],
    ids=["top-level-key", "step-flag", "yaml-syntax", "output-is-the-recipe"],
)
def test_bad_recipes_are_refused_in_one_line_before_any_step(tmp_path, capsys, text, expected):
    """Unknown keys (with the nearest valid one), syntax errors and a step that would write
    over the recipe file itself: exit 2, one line, nothing run."""
    from megatron_prune.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("${here}", str(recipe)))
    before = recipe.read_bytes()
    code = main(["run", str(recipe), "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert recipe.read_bytes() == before and not (tmp_path / "work").exists()
