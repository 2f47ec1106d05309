"""Benchmark: peak memory (summed over every rank) and wall time of `convert` and `prune`.

Why: `prune` used to load the whole model on every rank, so host memory grew with the world size
(issue 13). This measures what a user sees: the CLI run as a subprocess, exactly as typed, on a
random-weight checkpoint built from a real model's shapes (no download), at world sizes 1, 2
and 4, one run at a time.

* Peak memory: every ~0.1 s, the proportional set size (Pss, /proc/PID/smaps_rollup) summed over
  the whole process tree (the launcher, torchrun's agent and every rank; ranks run in their own
  sessions, so the tree is walked by parent pid, not by session or process group). Pss divides
  shared pages between the processes sharing them, so the libraries every rank maps count once.
  The reported peak is the maximum of that sum over time.
* Wall time: process start to exit, against a durable copy of the same checkpoint
  (`shutil.copytree`, then fsync of every file; Megatron's writer fsyncs too), measured in the
  same session. The page cache is as warm for both as memory allows (the inputs were just
  written or read; a 13 GB checkpoint next to a 13 GB process may not stay cached).
* Goals (issue 13): summed peak <= 1.5 x the source checkpoint's size on disk + 0.5 GB per rank;
  wall time <= 2 x the durable copy. GB = 1e9 bytes throughout.

Inputs are built once and cached under --work: a Hugging Face folder (config.json, safetensors
shards written one at a time, a small word-level tokenizer), its TP=1 Megatron checkpoint (the
`prune` source), calibration text, scores from one tiny `score` run (2 x 32 tokens by default;
importance values do not change the memory or time of surgery) and the target YAML (about half
the block parameters: narrower hidden size and FFN, fewer layers).

Layouts per world size: 1 = TP1; 2 = TP2 and PP2; 4 = TP2 x PP2, and TP4 where heads, groups
and FFN (source and target) allow it. `convert` = HF folder -> Megatron checkpoint at the layout;
`prune` = the TP=1 checkpoint pruned and written at the layout.

usage: python tools/bench_memory.py --shape llama-3.2-1b --world-sizes 1 2 4 \
           --commands convert prune --work DIR [--out DIR]
prints JSON results and a Markdown table; --out DIR also writes bench_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

GB = 1e9
MEMORY_FACTOR = 1.5  # x the checkpoint's size on disk
MEMORY_PER_RANK = 0.5 * GB
TIME_FACTOR = 2.0  # x a durable copy


@dataclass(frozen=True)
class Shape:
    """A Llama-family model's shapes and the pruning target used for it."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    # the target: about half the block parameters; layer counts stay even so PP=2 divides them
    target_hidden_size: int = 0
    target_num_layers: int = 0
    target_ffn_hidden_size: int = 0

    def target(self) -> Shape:
        """The pruned shape (heads and groups kept)."""
        data = asdict(self)
        data.update(num_layers=self.target_num_layers, hidden_size=self.target_hidden_size,
                    ffn_hidden_size=self.target_ffn_hidden_size)  # fmt: skip
        return Shape(**data)

    def block_params(self) -> int:
        """Parameters in the transformer blocks (attention, MLP, the two norms), which is what
        pruning targets; embeddings are left out."""
        q = self.num_attention_heads * self.head_dim
        kv = 2 * self.num_query_groups * self.head_dim
        h, f = self.hidden_size, self.ffn_hidden_size
        return self.num_layers * (h * (q + kv) + q * h + 3 * h * f + 2 * h)

    def allows(self, tp: int, pp: int) -> bool:
        """Whether Megatron can split this shape at tp x pp (whole heads and groups per TP
        rank, whole layers per stage); the vocabulary is padded, so it never blocks."""
        widths = (self.num_attention_heads, self.num_query_groups, self.ffn_hidden_size)
        return all(w % tp == 0 for w in widths) and self.num_layers % pp == 0


def _named(name: str, **target: int) -> Shape:
    """A shape of the library's table (megatron_prune.models.shapes) with a pruning target."""
    from megatron_prune.models.shapes import SHAPES as NAMED

    a = NAMED[name]
    return Shape(
        num_layers=a.num_layers, hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads, num_query_groups=a.num_query_groups,
        head_dim=a.head_dim, ffn_hidden_size=a.ffn_hidden_size, vocab_size=a.vocab_size,
        tie_embeddings=a.tie_embeddings, norm_eps=a.norm_eps, rope_theta=a.rope_theta,
        max_position_embeddings=a.max_position_embeddings, **target,
    )  # fmt: skip


SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": _named(
        "llama-3.2-1b", target_hidden_size=1536, target_num_layers=14, target_ffn_hidden_size=5120
    ),
    "llama-3.2-3b": _named(
        "llama-3.2-3b", target_hidden_size=2304, target_num_layers=24, target_ffn_hidden_size=5120
    ),
    # a functional check in a minute or two: TP=4 and PP=2 divide it
    "tiny": Shape(
        num_layers=8, hidden_size=128, num_attention_heads=8, num_query_groups=4, head_dim=16,
        ffn_hidden_size=256, vocab_size=512, max_position_embeddings=512,
        target_hidden_size=96, target_num_layers=6, target_ffn_hidden_size=160,
    ),
}  # fmt: skip

LAYOUTS: dict[int, list[tuple[int, int]]] = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2), (4, 1)]}


# ---------------------------------------------------------------- building the inputs


def _hf_tensor_shapes(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the Hugging Face Llama checkpoint, in file order."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_query_groups * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape.tie_embeddings:
        out.append(("lm_head.weight", (shape.vocab_size, h)))
    return out


def _plan_shards(tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list]:
    """Group tensors into files of at most ``shard_bytes`` (a larger tensor gets its own), so
    building never holds more than one file's worth of weights."""
    shards: list[list] = [[]]
    size = 0
    for name, dims in tensors:
        nbytes = 4 * _numel(dims)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    return shards


def _numel(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _hf_config(shape: Shape, bos_id: int, eos_id: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "rms_norm_eps": shape.norm_eps,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tie_embeddings,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


_WORDS = (
    "the of and to a in that was her it his she he had as with for not but be you at on is by "
    "all which have this so my from were they would been no very said could one there or more "
    "their what an when any must much such will him should if me miss every than who some being "
    "only little time day great mother father sister house letter room morning evening walk "
    "garden friend family heart mind moment manner young happy kind well good long never again "
    "always thought felt knew wished hoped believed returned replied looked seemed made came"
).split()


def calibration_text(words: int = 4000, seed: int = 0) -> str:
    """Deterministic English-like text: the importance values do not matter here, only that
    `score` gets enough tokens from the checkpoint's tokenizer."""
    rng = random.Random(seed)
    sentences, n = [], 0
    while n < words:
        k = rng.randint(6, 16)
        sentence = " ".join(rng.choice(_WORDS) for _ in range(k))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        n += k
    return "\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)) + "\n"


def write_tokenizer(folder: Path, text: str, vocab_size: int) -> tuple[int, int]:
    """A word-level tokenizer over ``text`` (ids below ``vocab_size``) with <unk>, <bos> and
    <eos>, as Hugging Face tokenizer files: `score` tokenizes with the checkpoint's tokenizer,
    and a real 128k-entry tokenizer is not needed to measure memory. Returns (bos, eos) ids."""
    import re

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for word in sorted(set(re.findall(r"\w+|[^\w\s]", text.lower()))):
        if len(vocab) >= vocab_size:
            break
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return vocab["<bos>"], vocab["<eos>"]


def build_hf_folder(shape: Shape, folder: Path, text: str, shard_bytes: int, seed: int = 0) -> None:
    """Random fp32 weights of ``shape`` as a Hugging Face Llama folder, one safetensors shard at
    a time (a 3B model is ~13 GB in fp32; the builder holds one shard). Matrices are scaled by
    1/sqrt(fan_in) and norms are near 1, so the model computes finite activations. Written to
    FOLDER.partial and renamed, so an interrupted build is never mistaken for a cached one."""
    import torch
    from safetensors.torch import save_file

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards = _plan_shards(_hf_tensor_shapes(shape), shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for tname, dims in shard:
            t = torch.randn(dims, generator=gen)
            if len(dims) == 1:
                t.mul_(0.02).add_(1.0)
            else:
                t.mul_(dims[1] ** -0.5)
            tensors[tname] = t
            weight_map[tname] = name
            total += 4 * t.numel()
        save_file(tensors, str(partial / name), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    bos, eos = write_tokenizer(partial, text, shape.vocab_size)
    (partial / "config.json").write_text(json.dumps(_hf_config(shape, bos, eos), indent=2))
    partial.rename(folder)


def target_yaml(shape: Shape) -> str:
    t = shape.target()
    return (
        f"# about {t.block_params() / shape.block_params():.0%} of the block parameters kept\n"
        f"hidden_size: {t.hidden_size}\nnum_layers: {t.num_layers}\n"
        f"ffn_hidden_size: {t.ffn_hidden_size}\n"
    )


# ---------------------------------------------------------------- measuring


@dataclass
class Measurement:
    argv: list[str]
    returncode: int
    wall_s: float
    peak_pss_bytes: int  # max over time of the tree's summed Pss
    peak_process_pss_bytes: int  # the largest single process
    peak_ranks_pss_bytes: int  # max over time of the ranks' (and their helpers') summed Pss
    processes: int  # distinct processes seen in the tree
    samples: int
    timed_out: bool = False
    log_tail: str = ""


def _pss(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 if it has exited or is unreadable)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _is_rank(p: psutil.Process) -> bool:
    """Whether ``p`` is a torchrun rank or a helper a rank forked (they inherit LOCAL_RANK);
    the rest of the tree is the launcher and torchrun's agent."""
    try:
        return "LOCAL_RANK" in p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_measured(argv: list[str], log: Path, timeout_s: float, interval_s: float) -> Measurement:
    """Run ``argv`` and sample its process tree's summed Pss every ``interval_s`` until it
    exits. Output goes to ``log`` (a pipe could fill and stall the run). Each rank gets
    OMP_NUM_THREADS=1, as the CLI's torchrun re-launch sets it (world size 1 does not re-launch,
    so it is set here for every run alike)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    peak = peak_one = peak_ranks = samples = 0
    seen: set[int] = set()
    ranks: dict[int, bool] = {}  # pid -> is a rank
    timed_out = False
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            procs = _tree(root)
            sizes = [_pss(p.pid) for p in procs]
            seen.update(p.pid for p, s in zip(procs, sizes, strict=True) if s)
            for p in procs:  # re-read until True: a rank forked but not yet exec'd looks
                if not ranks.get(p.pid):  # like its launcher
                    ranks[p.pid] = _is_rank(p)
            in_ranks = sum(s for p, s in zip(procs, sizes, strict=True) if ranks[p.pid])
            peak, peak_one = max(peak, sum(sizes)), max(peak_one, *sizes, 0)
            peak_ranks = max(peak_ranks, in_ranks)
            samples += 1
            if time.perf_counter() - t0 > timeout_s:
                timed_out = True
                for p in reversed(procs):  # ranks first, then their launchers
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
                proc.wait()
                break
            time.sleep(interval_s)
        wall = time.perf_counter() - t0
    tail = "" if proc.returncode == 0 else "\n".join(log.read_text().splitlines()[-15:])
    if not any(ranks.values()):  # world size 1: no re-launch, the command is the rank
        peak_ranks = peak
    return Measurement(argv, proc.returncode, wall, peak, peak_one, peak_ranks, len(seen), samples,
                       timed_out, tail)  # fmt: skip


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (apparent size)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def durable_copy_s(src: Path, scratch: Path, repeats: int) -> float:
    """Best-of-``repeats`` seconds to copy ``src`` and fsync every file: the floor for writing
    a checkpoint of the same bytes that survives a crash."""
    best = float("inf")
    for _ in range(repeats):
        dst = scratch / "durable_copy"
        shutil.rmtree(dst, ignore_errors=True)
        t0 = time.perf_counter()
        shutil.copytree(src, dst)
        for p in dst.rglob("*"):
            if p.is_file():
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        best = min(best, time.perf_counter() - t0)
        shutil.rmtree(dst)
    return best


# ---------------------------------------------------------------- the benchmark


def cli() -> list[str]:
    """The `megatron-prune` console script of this interpreter's environment (what a user
    types), or the module if it is not installed as a script."""
    script = Path(sys.executable).parent / "megatron-prune"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "megatron_prune.cli"]


@dataclass
class Inputs:
    hf: Path
    megatron: Path
    scores: Path
    target: Path
    prepare: dict[str, Any] = field(default_factory=dict)


def prepare(name: str, shape: Shape, work: Path, args: argparse.Namespace) -> Inputs:
    """Build (or reuse) the inputs of ``shape`` under WORK/NAME; a changed shape or calibration
    setting rebuilds them."""
    folder = work / name
    key = {"shape": asdict(shape), "samples": args.samples, "seq_len": args.seq_len}
    key_file = folder / "inputs.json"
    if folder.exists() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
        for sub in ("hf", "hf.partial", "megatron_tp1", "scores", "calibration.txt",
                    "target.yaml"):  # fmt: skip
            path = folder / sub
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=2))
    text_file = folder / "calibration.txt"
    if not text_file.is_file():
        text_file.write_text(calibration_text(max(4000, 4 * args.samples * args.seq_len)))
    inputs = Inputs(folder / "hf", folder / "megatron_tp1", folder / "scores",
                    folder / "target.yaml")  # fmt: skip
    inputs.target.write_text(target_yaml(shape))
    if not inputs.hf.is_dir():
        print(f"[{name}] building random weights in {inputs.hf}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        build_hf_folder(shape, inputs.hf, text_file.read_text(), int(args.shard_gb * GB))
        inputs.prepare["build_hf_s"] = time.perf_counter() - t0
    steps = (
        (inputs.megatron, "convert", [str(inputs.hf), str(inputs.megatron)]),
        (inputs.scores, "score", [str(inputs.megatron), "--data", str(text_file), "--samples",
                                  str(args.samples), "--seq-len", str(args.seq_len), "--out",
                                  str(inputs.scores)]),
    )  # fmt: skip
    for out, command, rest in steps:
        if out.is_dir():
            continue
        print(f"[{name}] {command} (input, not measured as a row)", file=sys.stderr, flush=True)
        m = run_measured([*cli(), command, *rest], folder / "logs" / f"prepare_{command}.log",
                         args.timeout, args.interval)  # fmt: skip
        if m.returncode != 0:
            raise SystemExit(f"[{name}] preparing inputs: {command} failed:\n{m.log_tail}")
        inputs.prepare[command] = asdict(m)
    return inputs


def layouts(shape: Shape, command: str, world_size: int) -> list[tuple[int, int]]:
    """The layouts measured at ``world_size`` that the command's model shapes allow (convert:
    the source; prune: the source is read at TP=1, the target written at the layout)."""
    model = shape if command == "convert" else shape.target()
    return [(tp, pp) for tp, pp in LAYOUTS[world_size] if model.allows(tp, pp)]


def bench_row(name: str, command: str, tp: int, pp: int, inputs: Inputs, source_bytes: int,
              copy_s: float, work: Path, args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    """One measured run; its output is deleted afterwards (a 3B checkpoint is ~13 GB)."""
    out = work / name / "runs" / f"{command}_tp{tp}_pp{pp}"
    shutil.rmtree(out, ignore_errors=True)
    layout = ["--tp", str(tp), "--pp", str(pp)]
    if command == "convert":
        argv = [*cli(), "convert", str(inputs.hf), str(out), *layout]
    else:
        argv = [*cli(), "prune", str(inputs.megatron), "--scores", str(inputs.scores),
                "--target", str(inputs.target), "--out", str(out), *layout]  # fmt: skip
    print(f"[{name}] {command} TP={tp} PP={pp}", file=sys.stderr, flush=True)
    m = run_measured(argv, work / name / "logs" / f"{command}_tp{tp}_pp{pp}.log",
                     args.timeout, args.interval)  # fmt: skip
    ok = m.returncode == 0 and out.is_dir()
    out_bytes = dir_bytes(out) if ok else None
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    ranks = tp * pp
    goal = MEMORY_FACTOR * source_bytes + MEMORY_PER_RANK * ranks
    ratio = m.wall_s / copy_s if ok else None
    return {
        "shape": name, "command": command, "tp": tp, "pp": pp, "ranks": ranks,
        "ok": ok, "returncode": m.returncode, "timed_out": m.timed_out,
        "wall_s": m.wall_s, "peak_pss_gb": m.peak_pss_bytes / GB,
        "peak_process_pss_gb": m.peak_process_pss_bytes / GB,
        "peak_ranks_pss_gb": m.peak_ranks_pss_bytes / GB, "processes": m.processes,
        "samples": m.samples, "source_gb": source_bytes / GB,
        "output_gb": None if out_bytes is None else out_bytes / GB,
        "memory_goal_gb": goal / GB, "memory_ok": ok and m.peak_pss_bytes <= goal,
        "durable_copy_s": copy_s, "time_ratio": ratio,
        "time_ok": ratio is not None and ratio <= TIME_FACTOR,
        "argv": m.argv, "error": m.log_tail,
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    def yes(flag: bool, ok: bool) -> str:
        return "pass" if flag else ("FAIL" if ok else "-")

    lines = [
        "| shape | command | layout | ranks | size on disk (GB) | summed peak Pss (GB) | "
        "ranks only (GB) | goal (GB) | memory | wall (s) | durable copy (s) | wall / copy | time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layout = f"TP{r['tp']}" + (f" x PP{r['pp']}" if r["pp"] > 1 else "")
        if r["tp"] == 1 and r["pp"] > 1:
            layout = f"PP{r['pp']}"
        if r["ok"]:
            wall = f"{r['wall_s']:.1f}"
        elif r["timed_out"]:
            wall = "timed out"
        elif r["returncode"] == -9:  # SIGKILL from outside: on these runs, the OOM killer
            wall = "killed (out of memory?)"
        else:
            wall = f"failed (rc {r['returncode']})"
        ratio = f"{r['time_ratio']:.2f}" if r["time_ratio"] is not None else "-"
        lines.append(
            f"| {r['shape']} | {r['command']} | {layout} | {r['ranks']} | {r['source_gb']:.3f} | "
            f"{r['peak_pss_gb']:.2f} | {r['peak_ranks_pss_gb']:.2f} | {r['memory_goal_gb']:.2f} | "
            f"{yes(r['memory_ok'], r['ok'])} | {wall} | {r['durable_copy_s']:.2f} | {ratio} | "
            f"{yes(r['time_ok'], r['ok'])} |"
        )  # fmt: skip
    return "\n".join(lines)


def write_results(out: Path | None, inputs: dict[str, Any], rows: list[dict[str, Any]]) -> dict:
    """The results as one JSON object, also written (with the table) to ``out`` if given."""
    result = {
        "machine": {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / GB},
        "goals": {"memory": f"summed peak Pss <= {MEMORY_FACTOR} x size on disk + "
                            f"{MEMORY_PER_RANK / GB} GB per rank",
                  "time": f"wall <= {TIME_FACTOR} x durable copy"},
        "inputs": inputs,
        "rows": rows,
    }  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_memory.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "bench_memory.md").write_text(markdown(rows) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs="+", choices=list(SHAPES), default=["tiny"])
    parser.add_argument("--world-sizes", nargs="+", type=int, choices=sorted(LAYOUTS),
                        default=[1, 2, 4])  # fmt: skip
    parser.add_argument("--commands", nargs="+", choices=["convert", "prune"],
                        default=["convert", "prune"])  # fmt: skip
    parser.add_argument(
        "--work",
        type=Path,
        required=True,
        help="inputs are cached here (free disk: ~20 GB for the 1B shape, ~40 GB for 3B)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write bench_memory.{json,md}")
    parser.add_argument("--samples", type=int, default=2, help="calibration samples for score")
    parser.add_argument("--seq-len", type=int, default=32, help="calibration tokens per sample")
    parser.add_argument("--interval", type=float, default=0.1, help="memory sampling period (s)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run (s), then killed")
    parser.add_argument("--copy-repeats", type=int, default=1, help="durable copies, best of N")
    parser.add_argument("--shard-gb", type=float, default=1.0, help="safetensors shard size")
    parser.add_argument("--keep-outputs", action="store_true", help="keep each run's checkpoint")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    prepared: dict[str, Any] = {}
    for name in args.shape:
        shape = SHAPES[name]
        inputs = prepare(name, shape, args.work, args)
        sources = {"convert": inputs.hf, "prune": inputs.megatron}
        copies = {c: durable_copy_s(sources[c], args.work / name, args.copy_repeats)
                  for c in args.commands}  # fmt: skip
        prepared[name] = {
            "shape": asdict(shape),
            "block_params": shape.block_params(),
            "target_block_params": shape.target().block_params(),
            "source_bytes": {c: dir_bytes(sources[c]) for c in args.commands},
            "durable_copy_s": copies,
            "prepare": inputs.prepare,
        }
        for command in args.commands:
            for ws in args.world_sizes:
                for tp, pp in layouts(shape, command, ws):
                    rows.append(bench_row(name, command, tp, pp, inputs,
                                          prepared[name]["source_bytes"][command],
                                          copies[command], args.work, args))  # fmt: skip
                    write_results(args.out, prepared, rows)  # a long run keeps what it measured
    result = write_results(args.out, prepared, rows)
    print(json.dumps(result, indent=2))
    print(markdown(rows))


if __name__ == "__main__":
    main()
