"""Benchmark: held-out perplexity right after pruning (no training), SmolLM2-135M and Gemma 3
270M, at ~25% and ~50% fewer transformer-block parameters, pruned jointly in width and depth:
Minitron-style (activation importance, no re-initialisation), +CLAP, +CLAP+SLNP, and ShortGPT
depth-only at about the same parameter count; for Gemma 3 also sandwich vs absorbed vs simply
removed post-norms. Also times the surgery against copying the checkpoint's bytes.

Everything runs in one process at TP=1; the scores come from one calibration run per model on
the five calibration novels, the perplexity from the held-out one (Persuasion).

usage: python tools/bench_prune_quality.py --out DIR [--samples 32] [--eval-tokens 4096]
writes DIR/results.json, DIR/pruning_quality.png and prints a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# (model, budget label, target, ShortGPT layers at about the same block parameters)
TARGETS = {
    "smollm2": {
        "25%": ({"num_layers": 26, "hidden_size": 512, "ffn_hidden_size": 1408}, 22),
        "50%": ({"num_layers": 24, "hidden_size": 448, "ffn_hidden_size": 1152,
                 "num_attention_heads": 6, "num_query_groups": 3}, 14),
    },
    "gemma3": {
        "25%": ({"num_layers": 16, "hidden_size": 576, "ffn_hidden_size": 1792}, 13),
        "50%": ({"num_layers": 14, "hidden_size": 512, "ffn_hidden_size": 1536,
                 "num_attention_heads": 2, "num_query_groups": 1}, 8),
    },
}  # fmt: skip
VARIANTS = {"minitron": {}, "+clap": {"clap": True}, "+clap+slnp": {"clap": True, "slnp": True}}


def block_params(arch) -> int:
    attn = arch.hidden_size * (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    attn += arch.num_attention_heads * arch.head_dim * arch.hidden_size
    return arch.num_layers * (attn + 3 * arch.hidden_size * arch.ffn_hidden_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    args = parser.parse_args()

    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.sharding import load_full_state
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.data.corpus import cache_dir, write_splits
    from megatron_prune.data.models import gemma3_270m_gguf, smollm2_135m_gguf
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.perplexity import perplexity
    from megatron_prune.importance.scoring import ScoreJob, load_scores, run_score_job
    from megatron_prune.models.arch import ModelArch
    from megatron_prune.models.gpt import build_model
    from megatron_prune.plan.target import load_target
    from megatron_prune.stages.convert import to_megatron
    from megatron_prune.surgery.prune import PruneOptions, prune_model

    args.out.mkdir(parents=True, exist_ok=True)
    layout = ParallelLayout()
    initialize(layout, "cpu")
    calibration, evaluation = write_splits(cache_dir() / "text")
    paths = {"smollm2": smollm2_135m_gguf, "gemma3": gemma3_270m_gguf}
    results: dict = {"settings": vars(args) | {"out": "OUT"}, "runs": []}

    for name in args.models:
        ckpt = cache_dir() / "models" / f"{name}_mcore"
        if not ckpt.exists():
            to_megatron(open_source(f"gguf:{paths[name]()}"), ckpt, layout, False, "cpu")
        model = load_model(ckpt)
        tok = load_tokenizer(ckpt)
        arch = model.arch
        bos = tok.bos_id if arch.needs_bos else None
        ids = tok.encode(evaluation.read_text())[: args.eval_tokens]

        def ppl(state, new_arch: ModelArch, ids=ids, bos=bos) -> float:
            chunks = build_model(new_arch, initialize=False)
            load_full_state(chunks, state)
            return perplexity(
                chunks, ids, args.seq_len, new_arch.vocab_size, bos, progress=False
            ).ppl

        scores_dir = args.out / f"{name}_scores"
        if not (scores_dir / "scores.safetensors").exists():
            job = ScoreJob(checkpoint=str(ckpt), data=str(calibration), samples=args.samples,
                           seq_len=args.seq_len, out=str(scores_dir), metrics=["channel", "head",
                           "group", "neuron", "layer", "post_norm"])  # fmt: skip
            run_score_job(job, model, tok, layout, resume=False, overwrite=True)
        scores = load_scores(scores_dir, arch)
        whole = {
            k: v for k, v in model.chunks[0].state_dict().items() if not k.endswith("_extra_state")
        }
        dense = block_params(arch)

        def record(budget, variant, state, new_arch, seconds=None, name=name, dense=dense, ppl=ppl):
            run = {"model": name, "budget": budget, "variant": variant,
                   "block_params": block_params(new_arch), "block_fraction_removed":
                   1 - block_params(new_arch) / dense, "ppl": ppl(state, new_arch)}  # fmt: skip
            if seconds is not None:
                run["surgery_s"] = seconds
            results["runs"].append(run)
            print(json.dumps(run), flush=True)

        record("0%", "dense", whole, arch)
        for budget, (target_dict, shortgpt_layers) in TARGETS[name].items():
            target = load_target(target_dict, arch)
            for variant, flags in VARIANTS.items():
                t0 = time.perf_counter()
                res = prune_model(whole, arch, scores, target, PruneOptions(**flags))
                record(budget, variant, res.state, res.arch, time.perf_counter() - t0)
            depth = load_target({"num_layers": shortgpt_layers}, arch)
            res = prune_model(whole, arch, scores, depth)
            record(budget, "shortgpt", res.state, res.arch)
            if arch.post_norms:
                for variant, opts in (("+clap+slnp absorbed", {"absorb_post_norms": True}),):
                    res = prune_model(whole, arch, scores, target,
                                      PruneOptions(clap=True, slnp=True, **opts))  # fmt: skip
                    record(budget, variant, res.state, res.arch)
                res = prune_model(whole, arch, scores, target, PruneOptions(clap=True, slnp=True))
                removed = {k: v for k, v in res.state.items() if "post_norm" not in k}
                record(
                    budget,
                    "+clap+slnp post-norms removed",
                    removed,
                    ModelArch.from_dict({**res.arch.to_dict(), "post_norms": False}),
                )
        if arch.post_norms:
            res = prune_model(whole, arch, scores, load_target({}, arch),
                              PruneOptions(absorb_post_norms=True))  # fmt: skip
            record("0%", "absorbed", res.state, res.arch)
            removed = {k: v for k, v in whole.items() if "post_norm" not in k}
            record(
                "0%",
                "post-norms removed",
                removed,
                ModelArch.from_dict({**arch.to_dict(), "post_norms": False}),
            )
        results["copy_vs_surgery"] = results.get("copy_vs_surgery", {})
        results["copy_vs_surgery"][name] = copy_ratio(ckpt, whole, arch, scores)
        del model
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "pruning_quality.png")
    print(table(results))


def copy_ratio(ckpt, whole, arch, scores) -> dict:
    """Surgery (the 50% joint target with CLAP+SLNP) vs a durable copy of the checkpoint."""
    from megatron_prune.plan.target import load_target
    from megatron_prune.surgery.prune import PruneOptions, prune_model

    target = load_target(
        TARGETS[arch.family if arch.family != "llama" else "smollm2"]["50%"][0], arch
    )
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        prune_model(whole, arch, scores, target, PruneOptions(clap=True, slnp=True))
        best = min(best, time.perf_counter() - t0)
    copy = float("inf")
    for _ in range(3):
        with tempfile.TemporaryDirectory(dir=ckpt.parent) as tmp:
            t0 = time.perf_counter()
            shutil.copytree(ckpt, Path(tmp) / "c")
            for f in (Path(tmp) / "c").rglob("*"):
                if f.is_file():
                    fd = os.open(f, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            copy = min(copy, time.perf_counter() - t0)
    return {"surgery_s": best, "durable_copy_s": copy, "ratio": best / copy}


def table(results) -> str:
    rows = ["| model | removed | variant | block params removed | ppl |", "|---|---|---|---|---|"]
    for r in results["runs"]:
        rows.append(f"| {r['model']} | {r['budget']} | {r['variant']} | "
                    f"{100 * r['block_fraction_removed']:.0f}% | {r['ppl']:.1f} |")  # fmt: skip
    return "\n".join(rows)


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        runs = [r for r in results["runs"] if r["model"] == model]
        for variant in dict.fromkeys(r["variant"] for r in runs):
            pts = sorted(
                (100 * r["block_fraction_removed"], r["ppl"])
                for r in runs
                if r["variant"] == variant
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=variant)
        ax.set_yscale("log")
        ax.set_xlabel("transformer-block parameters removed (%)")
        ax.set_ylabel("held-out perplexity (no training)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
