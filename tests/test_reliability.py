"""Nothing lost, nothing half-done: bad inputs and faults as a user meets them.

Refusals run the command line in this process (``cli.main``: validation happens before any rank
is spawned) and check the exit code 2, one line on stderr, the sources' bytes and that nothing
was left behind. Faults (a signal to a running TP=1, TP=2 or TP=3 job, NaN weights found while
converting)
run the command as a subprocess, as a user or a scheduler would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_prune import cli
from megatron_prune.paths import RUN_ID_ENV
from tests.helpers import REPO
from tests.helpers import cli as cli_subprocess
from tests.tiny_models import make_hf_model, random_scores, save_hf_model, save_word_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while seven tired owls watch from an old "
         "barn near the river and nobody minds at all").split()  # fmt: skip


def _text(n_words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


def _digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or ``path`` itself) with the SHA-256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny HF model (4 heads / 2 groups) with a word tokenizer, its TP=1 checkpoint, scores
    and a target."""
    return _make_env(tmp_path_factory.mktemp("reliability"), _text(400))


@pytest.fixture(autouse=True)
def _own_run_id(monkeypatch):
    """``cli.main`` sets the run id of its command in os.environ: keep it to each test."""
    monkeypatch.setenv(RUN_ID_ENV, "pytest")  # records the old value, restored after the test
    monkeypatch.delenv(RUN_ID_ENV)


def _refused(capsys, argv: list[str], *needles: str) -> str:
    """Run ``megatron-prune ARGV`` in this process; it must refuse with one line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == cli.EXIT_USER_ERROR, err
    assert len(lines) == 1 and lines[0].startswith("megatron-prune "), err
    for needle in needles:
        assert needle in err, err
    return err


def _leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".partial", ".lock", ".old", ".tmp"))


# --------------------------------------------------------------- sources are never written


def _source_cases(t: Path) -> list[tuple[str, list[str], Path]]:
    """(name, argv, the input the output would hit) for every command that writes."""
    ck, sc, tg, tx, hf = t / "ckpt", t / "scores", t / "target.yaml", t / "calib.txt", t / "hf"
    return [
        ("convert onto its source", ["convert", str(ck), str(ck), "--overwrite"], ck),
        ("convert into its source", ["convert", str(hf), str(hf / "sub")], hf),
        ("convert over a folder holding its source", ["convert", str(ck), str(t), "--overwrite"],
         ck),  # fmt: skip
        ("convert through a symlink", ["convert", str(hf), str(t / "link_to_hf"), "--overwrite"],
         hf),  # fmt: skip
        ("convert by a relative path",
         ["convert", str(ck), f"./{ck.name}/../{ck.name}", "--overwrite"], ck),  # fmt: skip
        ("convert onto a gguf: source's folder", ["convert", f"gguf:{hf}/x.gguf", str(hf)], hf),
        ("score onto its checkpoint", ["score", str(ck), "--data", str(tx), "--samples", "2",
                                       "--seq-len", "8", "--out", str(ck), "--overwrite"], ck),
        ("score onto its data", ["score", str(ck), "--data", str(tx), "--samples", "2",
                                 "--seq-len", "8", "--out", str(tx), "--overwrite"], tx),
        ("prune into its checkpoint", ["prune", str(ck), "--scores", str(sc), "--target", str(tg),
                                       "--out", str(ck / "pruned")], ck),
        ("prune onto its scores", ["prune", str(ck), "--scores", str(sc), "--target", str(tg),
                                   "--out", str(sc), "--overwrite"], sc),
        ("prune onto its target", ["prune", str(ck), "--scores", str(sc), "--target", str(tg),
                                   "--out", str(tg), "--overwrite"], tg),
        ("eval --out into its checkpoint", ["eval", "ppl", str(ck), "--data", str(tx), "--out",
                                            str(ck / "ppl.json")], ck),  # fmt: skip
        ("eval --out onto its data", ["eval", "ppl", str(ck), "--data", str(tx), "--out",
                                      str(tx)], tx),  # fmt: skip
        ("plan into its scores", ["plan", str(ck), "--scores", str(sc), "--budget", "params=0.5",
                                  "--out", str(sc / "plan.yaml")], sc),
        ("plan onto its latency table", ["plan", str(ck), "--budget", "latency=0.5",
                                         "--latency-table", str(tx), "--out", str(tx),
                                         "--overwrite"], tx),  # fmt: skip
        ("sparsify into its checkpoint", ["sparsify", str(ck), "--sparsity", "0.5", "--method",
                                          "magnitude", "--out", str(ck / "sparse")], ck),
        ("sparsify onto its scores", ["sparsify", str(ck), "--sparsity", "0.5", "--scores",
                                      str(sc), "--out", str(sc), "--overwrite"], sc),
        ("distill over its student", ["distill", "--student", str(ck), "--data", str(t / "ds"),
                                      "--train-tokens", "16", "--lm-weight", "1", "--out", str(t),
                                      "--overwrite"],
         ck),  # fmt: skip
        ("data build into its tokenizer's checkpoint",
         ["data", "build", "--tokenizer", str(ck), "--input", str(tx), "--output",
          str(ck / "ds")], ck),  # fmt: skip
        ("data build onto its input", ["data", "build", "--tokenizer", str(ck), "--input",
                                       str(t / "corpus.bin"), "--output", str(t / "corpus"),
                                       "--overwrite"], t / "corpus.bin"),  # fmt: skip
    ]


SOURCE_CASES = [c[0] for c in _source_cases(Path("x"))]


@pytest.mark.parametrize("case", SOURCE_CASES)
def test_outputs_never_touch_inputs(env, capsys, monkeypatch, case):
    monkeypatch.chdir(env)
    if not (env / "link_to_hf").exists():
        (env / "link_to_hf").symlink_to(env / "hf")
    (env / "corpus.bin").write_bytes(b"\0" * 64)
    (env / "ds.bin").write_bytes(b"\0" * 64)
    (env / "ds.idx").write_bytes(b"\0" * 64)
    _, argv, hit = next(c for c in _source_cases(env) if c[0] == case)
    before = _digest(env / "ckpt") | _digest(env / "hf") | _digest(hit)
    _refused(capsys, argv, "inputs are never written", str(hit.name))
    assert _digest(env / "ckpt") | _digest(env / "hf") | _digest(hit) == before
    assert not (env / "ckpt" / "pruned").exists() and not (env / "hf" / "sub").exists()
    assert not _leftovers(env)


# ------------------------------------------------------------ every check, before work, once


def test_target_yaml_syntax_error_and_unknown_key(env, capsys, tmp_path):
    ck, sc = env / "ckpt", env / "scores"
    bad = tmp_path / "broken.yaml"
    bad.write_text("ffn_hidden_size: [64, 64\nhidden_size: 32\n")
    _refused(capsys, ["prune", str(ck), "--scores", str(sc), "--target", str(bad), "--out",
                      str(tmp_path / "o")], "YAML syntax error at line", str(bad))  # fmt: skip
    typo = tmp_path / "typo.yaml"
    typo.write_text("hiden_size: 32\n")
    _refused(capsys, ["prune", str(ck), "--scores", str(sc), "--target", str(typo), "--out",
                      str(tmp_path / "o")], "'hiden_size' (did you mean 'hidden_size'?)",
             str(typo))  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_truncated_scores(env, capsys, tmp_path):
    import shutil

    scores = tmp_path / "scores"
    shutil.copytree(env / "scores", scores)
    blob = scores / "scores.safetensors"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
    _refused(capsys, ["prune", str(env / "ckpt"), "--scores", str(scores), "--target",
                      str(env / "target.yaml"), "--out", str(tmp_path / "o")],
             "scores.safetensors is truncated or damaged", "score again")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_output_under_a_file(env, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    _refused(capsys, ["convert", str(env / "hf"), str(tmp_path / "afile" / "sub" / "o")],
             "afile is a file, not a folder")  # fmt: skip


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_read_only_folder(env, capsys, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        _refused(capsys, ["convert", str(env / "hf"), str(folder / "o")], "is read-only")
    finally:
        folder.chmod(0o755)


def test_checkpoint_size_estimate_matches_what_is_written(env):
    """The free-space check's estimate of a checkpoint is what convert writes (within 25%)."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.checkpoint.size import checkpoint_bytes

    written = sum(p.stat().st_size for p in (env / "ckpt").rglob("*") if p.is_file())
    estimate = checkpoint_bytes(CheckpointMeta.read(env / "ckpt").arch)
    assert 0.75 * written <= estimate <= 1.25 * written, (estimate, written)


@contextlib.contextmanager
def _small_disk(folder: Path, size: str):
    """A real file system of ``size`` at ``folder`` (tmpfs; needs the right to mount)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mounts a tmpfs")
def test_too_little_free_space(env, capsys, tmp_path):
    """A 64 KB disk: convert, prune and distill are refused before any work, naming the space
    needed and free; nothing is left on the small disk."""
    ck = env / "ckpt"
    assert cli.main(["data", "build", "--tokenizer", str(ck), "--input", str(env / "calib.txt"),
                     "--output", str(tmp_path / "ds")]) == 0  # fmt: skip
    capsys.readouterr()
    with _small_disk(tmp_path / "small", "64k") as disk:
        _refused(capsys, ["convert", str(env / "hf"), str(disk / "o")],
                 "not enough free space for", "the converted checkpoint needs about")  # fmt: skip
        _refused(capsys, ["prune", str(ck), "--scores", str(env / "scores"), "--target",
                          str(env / "target.yaml"), "--out", str(disk / "p")],
                 "the pruned checkpoint needs about")  # fmt: skip
        _refused(capsys, ["distill", "--student", str(ck), "--data", str(tmp_path / "ds"),
                          "--train-tokens", "16", "--lm-weight", "1", "--out", str(disk / "d")],
                 "the distillation run (student and training checkpoints) needs")  # fmt: skip
        assert list(disk.iterdir()) == []


def test_output_another_run_is_writing(env, capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "o.lock"
        lock.write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                    "run": "another"}))  # fmt: skip
        _refused(capsys, ["convert", str(env / "hf"), str(tmp_path / "o")],
                 f"another run (pid {holder.pid}", f"delete the lock {lock}")  # fmt: skip
        assert lock.is_file() and not (tmp_path / "o").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(env, capsys, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "plan.yaml"
    (tmp_path / "plan.yaml.lock").write_text(json.dumps({"pid": dead.pid,
                                                         "host": os.uname().nodename,
                                                         "run": "gone"}))  # fmt: skip
    code = cli.main(["plan", str(env / "ckpt"), "--budget", "params=0.6", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and not _leftovers(tmp_path)


def test_sequence_parallel_lengths(env, capsys, tmp_path):
    from megatron_prune import api
    from megatron_prune.distributed import ParallelLayout
    from megatron_prune.errors import UserError

    _refused(capsys, ["score", str(env / "ckpt"), "--data", str(env / "calib.txt"), "--samples",
                      "2", "--seq-len", "25", "--tp", "2", "--sequence-parallel", "--out",
                      str(tmp_path / "s")], "--seq-len 25 is not a multiple of 2")  # fmt: skip
    text = tmp_path / "eval.txt"
    text.write_text(_text(35))  # 35 tokens: windows of 8 leave 3
    layout = ParallelLayout(tp=2, sequence_parallel=True)
    with pytest.raises(UserError, match="the last window of --data"):
        api.check_perplexity(env / "ckpt", text, seq_len=8, layout=layout)
    assert len(api.check_perplexity(env / "ckpt", text, seq_len=8, max_tokens=32,
                                    layout=layout)) == 35  # fmt: skip


def test_config_json_missing_a_key(env, capsys, tmp_path):
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(env / "hf", hf)
    config = json.loads((hf / "config.json").read_text())
    del config["num_attention_heads"]
    (hf / "config.json").write_text(json.dumps(config))
    _refused(capsys, ["convert", str(hf), str(tmp_path / "o")],
             f"{hf / 'config.json'} has no 'num_attention_heads'")  # fmt: skip


def test_text_not_utf8(env, capsys, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(_text(50).encode() + "caf\xe9 na\xefve\n".encode("latin-1"))
    _refused(capsys, ["score", str(env / "ckpt"), "--data", str(latin), "--samples", "2",
                      "--seq-len", "8", "--out", str(tmp_path / "s")],
             f"--data {latin} is not UTF-8 text", "convert it to UTF-8")  # fmt: skip


def test_ranks_that_do_not_fit_the_layout(env, capsys, tmp_path):
    _refused(capsys, ["convert", str(env / "hf"), str(tmp_path / "o"), "--tp", "2",
                      "--nproc-per-node", "3"], "needs a multiple of 2 ranks")  # fmt: skip


def test_nan_in_source_weights(env, tmp_path):
    """Found as the tensor is read (GGUF has no checksum): one line naming it, no output."""
    import shutil

    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    shutil.copytree(env / "hf", hf)
    blob = next(hf.glob("*.safetensors"))
    state = load_file(str(blob))
    name = "model.layers.1.mlp.up_proj.weight"
    state[name][3, 5] = float("nan")
    save_file(state, str(blob), metadata={"format": "pt"})
    r = cli_subprocess("convert", str(hf), str(tmp_path / "o"))
    assert r.returncode == cli.EXIT_USER_ERROR, r.stderr
    assert f"tensor {name} of {hf} holds 1 NaN or Inf values" in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in r.stderr and len(errors) == 1, r.stderr  # once, not per rank
    assert not (tmp_path / "o").exists() and not _leftovers(tmp_path)


# ------------------------------------------------------------------- a stopped job stops


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _start(argv: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop(RUN_ID_ENV, None)
    return subprocess.Popen([sys.executable, "-m", "megatron_prune.cli", *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_stopped_job_stops(env, tmp_path):
    """SIGTERM, then SIGKILL, to the command of a TP=2 convert: every rank is gone within a
    bounded time, no output appears, the source is untouched; a rerun completes."""
    src, dst = env / "hf", tmp_path / "tp2"
    before = _digest(src)
    argv = ["convert", str(src), str(dst), "--tp", "2"]
    for sig, when in ((signal.SIGTERM, "ranks started"), (signal.SIGKILL, "ranks writing")):
        proc = _start(argv)
        ranks: set[int] = set()

        def started(proc=proc, ranks=ranks, writing=when == "ranks writing") -> bool:
            ranks.update(_children(proc.pid))
            assert proc.poll() is None, proc.communicate()
            return len(ranks) >= 2 and (not writing or dst.with_suffix(".partial").exists())

        _wait_for(started, 120, when)
        ranks.update(_children(proc.pid))
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), stderr
        if sig == signal.SIGTERM:
            assert "stopped by SIGTERM; every rank has stopped" in stderr, stderr
        _wait_for(lambda ranks=ranks: not any(_alive(p) for p in ranks), 15, "ranks to exit")
        assert not dst.exists() and _digest(src) == before
    assert (tmp_path / "tp2.lock").exists()  # SIGKILL left a stale lock: the rerun takes it over
    r = cli_subprocess(*argv)
    assert r.returncode == 0, r.stderr
    assert (dst / "megatron_prune.json").is_file() and not _leftovers(tmp_path)
    assert _digest(src) == before


# ------------------------------------------- faults at random points, sources hashed


FAULT_SEED = 15  # the points and signals below are drawn from this seed: reruns repeat them


def _make_env(tmp: Path, text: str, **model_sizes) -> Path:
    """A tiny qwen2 HF model with a word tokenizer, its TP=1 checkpoint, random scores and a
    target: what the refusal and fault tests run on."""
    from safetensors.torch import save_file

    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.importance.scoring import FORMAT_VERSION, META_FILE, SCORES_FILE

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "calib.txt").write_text(text)
    hf = save_hf_model(make_hf_model("qwen2", seed=5, **model_sizes), tmp / "hf")
    save_word_tokenizer(hf, text)
    r = cli_subprocess("convert", str(hf), str(tmp / "ckpt"))
    assert r.returncode == 0, r.stderr
    arch = CheckpointMeta.read(tmp / "ckpt").arch
    scores = tmp / "scores"
    scores.mkdir()
    (scores / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                "arch": arch.to_dict()}))  # fmt: skip
    table = random_scores(arch)
    save_file({k: v.contiguous() for k, v in table.items()}, str(scores / SCORES_FILE))
    (tmp / "target.yaml").write_text(f"ffn_hidden_size: {arch.ffn_hidden_size // 2}\n")
    return tmp


# 6 heads / 3 query groups, FFN and the padded vocabulary divisible by 3: TP=3 splits it
TP3_SIZES = dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                 intermediate_size=192, vocab_size=384)  # fmt: skip


@pytest.fixture(scope="module")
def faults(env):
    """A TP=3-splittable model (its sources), a dataset for distill and the uninterrupted TP=1
    result of each command."""
    tmp = _make_env(env / "faults", (env / "calib.txt").read_text(), **TP3_SIZES)
    r = cli_subprocess("data", "build", "--tokenizer", str(tmp / "ckpt"), "--input",
                       str(tmp / "calib.txt"), "--output", str(tmp / "data" / "train"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    for command in FAULT_ARGS:
        r = cli_subprocess(*_fault_argv(tmp, command, tmp / f"{command}_ref"))
        assert r.returncode == 0, r.stderr
    return tmp


FAULT_ARGS = {
    "convert": [],
    "prune": ["--target", "{t}/target.yaml", "--scores", "{t}/scores"],
    "score": ["--data", "{t}/calib.txt", "--samples", "16", "--seq-len", "16",
              "--micro-batches", "2", "--save-every", "1"],  # fmt: skip
    "distill": ["--teacher", "{t}/ckpt", "--data", "{t}/data/train", "--train-tokens",
                "384", "--seq-len", "16", "--global-batch", "2", "--lm-weight", "0.5",
                "--save-interval", "2"],  # fmt: skip
}
# Observable points of each run: its process started (importing), its first log line (model
# loaded, work begun), OUT.partial (prune, score) or a metrics record (distill) on disk.
FAULT_POINTS = {"convert": ("started", "working", "writing"),
                "prune": ("started", "working", "writing"),
                "score": ("started", "working", "writing"),
                "distill": ("started", "working", "training")}  # fmt: skip


def _fault_argv(t: Path, command: str, out: Path, *extra: str) -> list[str]:
    if command == "convert":  # the Hugging Face folder to a dist checkpoint
        return ["convert", str(t / "hf"), str(out), *extra]
    first = ["distill", "--student"] if command == "distill" else [command]
    args = [a.format(t=t) for a in FAULT_ARGS[command]]
    return [*first, str(t / "ckpt"), *args, "--out", str(out), *extra]


def _sources(t: Path) -> dict[str, str]:
    return (_digest(t / "hf") | _digest(t / "ckpt") | _digest(t / "scores")
            | _digest(t / "target.yaml") | _digest(t / "calib.txt")
            | _digest(t / "data"))  # fmt: skip


def _reached(point: str, out: Path, stderr: Path) -> bool:
    if point == "started":
        return True
    if point == "working":
        return "[megatron-prune]" in stderr.read_text()
    if point == "writing":
        return out.with_name(out.name + ".partial").exists()
    metrics = out / "metrics.jsonl"  # training
    return metrics.is_file() and bool(metrics.read_text().strip())


def _whole_tensors(checkpoint: Path) -> dict:
    from megatron_prune.checkpoint.partial import CheckpointReader

    reader = CheckpointReader(checkpoint)
    return reader.read(reader.names())


def _same_result(command: str, ref: Path, got: Path, tp: int) -> None:
    """The rerun's output equals the uninterrupted TP=1 run's: bit for bit at TP=1 (and for
    convert and prune, exact at any TP), within float rounding of TP=3's reductions."""
    import torch
    from safetensors.torch import load_file

    exact = tp == 1 or command in ("convert", "prune")

    def close(a, b, what):
        ok = a.equal(b) if exact else torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7)
        assert ok, (command, tp, what)

    if command in ("convert", "prune"):
        one, two = _whole_tensors(ref), _whole_tensors(got)
    elif command == "score":
        one, two = (load_file(str(p / "scores.safetensors")) for p in (ref, got))
    else:
        one, two = ([json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]
                    for p in (ref, got))  # fmt: skip
        assert [r["step"] for r in two] == [r["step"] for r in one], (tp, two)
        one = {f"{r['step']}/{k}": torch.tensor(r[k]) for r in one for k in ("loss", "grad_norm")}
        two = {f"{r['step']}/{k}": torch.tensor(r[k]) for r in two for k in ("loss", "grad_norm")}
    assert set(one) == set(two) and one, (command, tp)
    for name in one:
        close(one[name], two[name], name)


def _rerun_flags(command: str, out: Path) -> list[str]:
    """What a user reruns with: --resume where a partial run can be continued."""
    if command == "score" and (out.with_name(out.name + ".partial") / "partial.json").is_file():
        return ["--resume"]
    if command != "distill" and out.exists():  # the signal came after it was published
        return ["--overwrite"]
    if command == "distill" and out.exists():
        has_step = any((out / "checkpoints").glob("step_*[0-9]"))
        return ["--resume"] if has_step else ["--overwrite"]
    return []


def _fault_cases() -> list[tuple[str, int, signal.Signals, str, float]]:
    """(command, tp, signal, point, delay): per command SIGTERM at one TP and SIGKILL at the
    other, each at a point and a delay after it drawn from FAULT_SEED."""
    import random

    rng = random.Random(FAULT_SEED)
    cases = []
    for command in FAULT_ARGS:
        sigs = rng.sample([signal.SIGTERM, signal.SIGKILL], 2)
        for tp, sig in zip((1, 3), sigs, strict=True):
            cases.append((command, tp, sig, rng.choice(FAULT_POINTS[command]),
                          round(rng.uniform(0.0, 0.1), 3)))  # fmt: skip
    return cases


# prune stays in `make test`; convert, score and distill run with `make test-all` (time)
FAULT_CASES = [pytest.param(c, marks=pytest.mark.slow) if c != "prune" else c for c in FAULT_ARGS]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("command", FAULT_CASES)
def test_faults_at_random_points(faults, tmp_path, command):
    """SIGTERM and SIGKILL to `megatron-prune COMMAND` at TP=1 (the command runs in its own
    process) and TP=3 (three ranks under its launcher): the sources keep their bytes, no process
    outlives the command, the output is absent or complete, and a rerun (or --resume) gives the
    uninterrupted result."""
    before = _sources(faults)
    for name, tp, sig, point, delay in [c for c in _fault_cases() if c[0] == command]:
        out, stderr = tmp_path / f"{name}_tp{tp}", tmp_path / f"{name}_tp{tp}.stderr"
        argv = _fault_argv(faults, command, out, "--tp", str(tp))
        penv = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        penv.pop(RUN_ID_ENV, None)
        with stderr.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "megatron_prune.cli", *argv],
                                    env=penv, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
        seen: set[int] = set()

        def at_point(proc=proc, out=out, stderr=stderr, point=point, seen=seen) -> bool:
            seen.update(_children(proc.pid))
            return proc.poll() is not None or _reached(point, out, stderr)

        _wait_for(at_point, 300, f"{name} TP={tp} to reach '{point}'")
        time.sleep(delay)
        seen.update(_children(proc.pid))
        finished_first = proc.poll() is not None
        if not finished_first:
            proc.send_signal(sig)
        proc.wait(timeout=60)
        case = (name, tp, sig.name, point, delay, stderr.read_text()[-2000:])
        if finished_first:  # the run ended before the point's delay ran out: it must be whole
            assert proc.returncode == 0, case
            print(f"{case[:5]}: finished before the signal")
        elif sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, case
        elif proc.returncode != -signal.SIGTERM:  # -SIGTERM: stopped while still starting up
            assert proc.returncode == 128 + signal.SIGTERM, case
            assert "stopped by SIGTERM" in stderr.read_text(), case
        _wait_for(lambda seen=seen: not any(_alive(p) for p in seen), 15, f"{case[:4]}: exit")
        assert _sources(faults) == before, case
        if command != "distill":  # its run folder holds metrics and checkpoints as it trains
            done = out / ("meta.json" if command == "score" else "megatron_prune.json")
            assert not out.exists() or done.is_file(), case  # absent, or published whole
        r = cli_subprocess(*argv, *_rerun_flags(command, out))
        assert r.returncode == 0, (case, r.stderr[-2000:])
        _same_result(command, faults / f"{command}_ref", out, tp)
        assert not _leftovers(tmp_path) and _sources(faults) == before, case
