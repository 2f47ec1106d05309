"""Recovery benchmark: SmolLM2-135M pruned to about half its transformer-block parameters
(width + depth, CLAP + SLNP), then trained on a fixed token budget of real text (five Austen
novels) either by online full-vocabulary distillation from the unpruned model or by the plain
LM loss; held-out perplexity (Persuasion) before, during and after.

Everything runs through the ``megatron-prune`` CLI, as a user would:
  python tools/bench_distill_recovery.py --out /tmp/recovery [--train-tokens 98304]
Writes OUT/recovery.json, OUT/recovery.md and docs/distill_recovery.{png,json} (with --docs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TARGET_50 = {"num_layers": 24, "hidden_size": 448, "ffn_hidden_size": 1152,
             "num_attention_heads": 6, "num_query_groups": 3}  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    """Run ``megatron-prune ARGS``; return stdout, fail loudly with stderr."""
    cmd = [sys.executable, "-m", "megatron_prune.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{proc.stderr[-4000:]}")
    return proc.stdout


def last_json(stdout: str) -> dict:
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])


def block_params(arch: dict) -> int:
    h, d = arch["hidden_size"], arch["head_dim"]
    attn = h * (arch["num_attention_heads"] + 2 * arch["num_query_groups"]) * d
    attn += arch["num_attention_heads"] * d * h
    return arch["num_layers"] * (attn + 3 * h * arch["ffn_hidden_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-tokens", type=int, default=96 * 1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--eval-interval", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (scoring)")
    parser.add_argument("--docs", action="store_true", help="also write docs/distill_recovery.*")
    args = parser.parse_args()

    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.data.corpus import cache_dir, write_splits
    from megatron_prune.data.models import smollm2_135m_gguf

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = write_splits(cache_dir() / "text")
    teacher = out / "teacher"
    if not teacher.exists():
        cli("convert", f"gguf:{smollm2_135m_gguf()}", str(teacher))
    if not (out / "scores").exists():
        cli("score", str(teacher), "--data", str(calibration), "--samples", str(args.samples),
            "--seq-len", "512", "--out", str(out / "scores"))  # fmt: skip
    student = out / "student_pruned"
    if not student.exists():
        import yaml

        (out / "target.yaml").write_text(yaml.safe_dump(TARGET_50))
        cli("prune", str(teacher), "--scores", str(out / "scores"), "--target",
            str(out / "target.yaml"), "--clap", "--slnp", "--out", str(student))  # fmt: skip
    if not (out / "data" / "austen.idx").exists():
        cli("data", "build", "--tokenizer", str(teacher), "--input", str(calibration),
            "--output", str(out / "data" / "austen"))  # fmt: skip

    def ppl(ckpt: Path) -> float:
        return last_json(cli("eval", "ppl", str(ckpt), "--data", str(evaluation),
                             "--max-tokens", str(args.eval_tokens)))["ppl"]  # fmt: skip

    common = ["--student", str(student), "--data", str(out / "data" / "austen"),
              "--train-tokens", str(args.train_tokens), "--seq-len", str(args.seq_len),
              "--global-batch", str(args.global_batch), "--lr", str(args.lr),
              "--min-lr", str(args.lr / 10), "--warmup-steps", "4",
              "--eval-data", str(evaluation), "--eval-tokens", str(args.eval_tokens),
              "--eval-interval", str(args.eval_interval), "--overwrite"]  # fmt: skip
    runs = {}
    for name, extra in (
        ("distill", ["--teacher", str(teacher)]),
        ("lm_only", ["--lm-weight", "1"]),
    ):
        started = time.perf_counter()
        cli("distill", *common, *extra, "--out", str(out / name))
        records = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
        runs[name] = {
            "seconds": time.perf_counter() - started,
            "curve": [
                (r["step"] * args.global_batch * args.seq_len, r["eval_ppl"])
                for r in records
                if "eval_ppl" in r
            ],  # fmt: skip
            "final_ppl": ppl(out / name / "student"),
        }
    t_arch = CheckpointMeta.read(teacher).arch.to_dict()
    s_arch = CheckpointMeta.read(student).arch.to_dict()
    result = {
        "settings": {**vars(args), "out": "OUT"},  # no machine paths in published results
        "block_fraction_removed": 1 - block_params(s_arch) / block_params(t_arch),
        "teacher_ppl": ppl(teacher),
        "pruned_ppl": ppl(student),
        **{f"{name}_ppl": run["final_ppl"] for name, run in runs.items()},
        "runs": runs,
    }
    (out / "recovery.json").write_text(json.dumps(result, indent=2))
    table = (
        "| model | held-out ppl |\n|---|---|\n"
        f"| SmolLM2-135M (teacher) | {result['teacher_ppl']:.1f} |\n"
        f"| pruned {result['block_fraction_removed']:.0%} of block params, CLAP+SLNP, no "
        f"training | {result['pruned_ppl']:.1f} |\n"
        f"| + LM loss, {args.train_tokens} tokens | {result['lm_only_ppl']:.1f} |\n"
        f"| + full-vocabulary KD, {args.train_tokens} tokens | {result['distill_ppl']:.1f} |\n"
    )
    (out / "recovery.md").write_text(table)
    print(table)
    if args.docs:
        plot(result, REPO / "docs" / "distill_recovery.png")
        (REPO / "docs" / "distill_recovery.json").write_text(json.dumps(result, indent=2))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("distill", "full-vocabulary KD"), ("lm_only", "LM loss only")):
        tokens, values = zip(*result["runs"][name]["curve"], strict=True)
        ax.plot(tokens, values, marker="o", label=label)
    ax.axhline(result["teacher_ppl"], color="gray", linestyle="--", label="teacher (unpruned)")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity (Persuasion)")
    ax.set_title(f"SmolLM2-135M, {result['block_fraction_removed']:.0%} of block params pruned")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
