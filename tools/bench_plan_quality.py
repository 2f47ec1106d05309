"""Benchmark: held-out perplexity with no training after pruning to a budget with each `plan`
strategy, same scores and same surgery: uniform, AlphaPruning (alpha), Tyr-the-Pruner's search
with expectation error accumulation on and off, and with prune's own units as its local
pruner. Reports each plan's search cost (tokens, wall time) and, for tyr, the calibration KL of
its start (the uniform plan) and of what it found. Then AlphaPruning's own setting,
unstructured masks (``sparsify``, default 70%): magnitude and Wanda, each with uniform and with
AlphaPruning per-layer ratios (``--masks``; none with ``--unstructured 0``).

``prune`` keeps the units with the best activation scores (head/l2, neuron/l2) at the planned
widths, for every strategy: tyr's own OBS choices and refit live only in its supernet (its KL
is not what prune then makes); ``tyr-scores`` searches over prune's own layers instead.

usage: python tools/bench_plan_quality.py --out DIR [--model smollm2|CKPT_OR_HF_DIR]
       [--budget params=0.5] [--samples 32] [--seq-len 512] [--eval-tokens 8192]
       [--tyr-samples 16 --tyr-seq-len 256 --tyr-generations 6 ...]
writes DIR/results.json and prints a Markdown table (everything runs in one process at TP=1)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (SmolLM2-135M GGUF, fetched and cached), or a "
                             "megatron-prune checkpoint / Hugging Face folder")  # fmt: skip
    parser.add_argument("--calibration", type=Path, default=None, help="default: the corpus")
    parser.add_argument("--heldout", type=Path, default=None, help="default: the corpus")
    parser.add_argument("--budget", default="params=0.5")
    parser.add_argument("--samples", type=int, default=32, help="scoring windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--tyr-samples", type=int, default=16)
    parser.add_argument("--tyr-seq-len", type=int, default=256)
    parser.add_argument("--tyr-iterations", type=int, default=3)
    parser.add_argument("--tyr-generations", type=int, default=6)
    parser.add_argument("--tyr-offspring", type=int, default=8)
    parser.add_argument("--tyr-stages", default="2:4,4:2,8:1")
    parser.add_argument("--strategies", nargs="+",
                        default=["uniform", "alpha", "tyr", "tyr-noeea", "tyr-scores"],
                        help="tyr: OBS local pruner with expectation error accumulation; "
                             "tyr-noeea: without it; tyr-scores: prune's own units (scores)")
    parser.add_argument("--unstructured", type=float, default=0.7,
                        help="sparsity of the mask runs (0: none)")
    parser.add_argument("--masks", nargs="*",
                        default=["magnitude-uniform", "magnitude-alpha", "wanda-uniform",
                                 "wanda-alpha"],
                        help="METHOD-ALLOCATION mask runs")  # fmt: skip
    args = parser.parse_args()

    from megatron_prune import api
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.plan.cost import block_params
    from megatron_prune.plan.tyr.job import TyrSettings, parse_stages

    args.out.mkdir(parents=True, exist_ok=True)
    calibration, heldout = args.calibration, args.heldout
    if calibration is None or heldout is None:
        from megatron_prune.data.corpus import cache_dir, write_splits

        calibration, heldout = write_splits(cache_dir() / "text")[:2]
    ckpt = args.out / "dense"
    if args.model == "smollm2":
        from megatron_prune.data.models import smollm2_135m_gguf

        source = f"gguf:{smollm2_135m_gguf()}"
    else:
        source = args.model
    if not (ckpt / "megatron_prune.json").is_file():
        api.convert(source, ckpt)
    arch = CheckpointMeta.read(ckpt).arch
    scores = args.out / "scores"
    if not (scores / "scores.safetensors").is_file():
        api.score(ckpt, calibration, scores, samples=args.samples, seq_len=args.seq_len,
                  metrics=["head", "neuron", "esd", "wanda"], overwrite=True)  # fmt: skip
    runs = []

    def evaluate(name: str, model: Path, extra: dict) -> None:
        result = api.perplexity(model, heldout, seq_len=args.seq_len, max_tokens=args.eval_tokens)
        new = CheckpointMeta.read(model).arch
        run = {"strategy": name, "ppl": result.ppl, "tokens": result.tokens,
               "block_params_kept": block_params(new) / block_params(arch), **extra}  # fmt: skip
        runs.append(run)
        print(json.dumps(run), flush=True)

    evaluate("dense", ckpt, {})
    for name in args.strategies:
        strategy = "tyr" if name.startswith("tyr") else name
        tyr = None
        if strategy == "tyr":
            tyr = TyrSettings(samples=args.tyr_samples, seq_len=args.tyr_seq_len,
                              iterations=args.tyr_iterations, generations=args.tyr_generations,
                              offspring=args.tyr_offspring, stages=parse_stages(args.tyr_stages),
                              error_accumulation=name != "tyr-noeea",
                              local_pruner="scores" if name == "tyr-scores" else "obs",
                              refit=name != "tyr-scores")  # fmt: skip
        plan_file = args.out / f"plan_{name}.yaml"
        t0 = time.perf_counter()
        plan = api.plan(ckpt, scores, plan_file, budget=args.budget, strategy=strategy,
                        seq_len=args.seq_len, data=calibration, tyr=tyr,
                        overwrite=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        pruned = args.out / f"pruned_{name}"
        api.prune(ckpt, scores, plan_file, pruned, overwrite=True)
        extra = {"plan_s": round(seconds, 1), "achieved": plan.record["achieved"]}
        if "tyr" in plan.record:
            t = plan.record["tyr"]
            extra.update({k: t[k] for k in ("kl_uniform", "kl_found", "search_tokens",
                                            "statistics_tokens", "evaluations")})  # fmt: skip
        evaluate(name, pruned, extra)
    for name in args.masks if args.unstructured > 0 else []:
        method, _, allocation = name.partition("-")
        masked = args.out / f"masked_{name}"
        t0 = time.perf_counter()
        api.sparsify(ckpt, masked, scores=scores, sparsity=args.unstructured, method=method,
                     allocation=allocation, overwrite=True)  # fmt: skip
        evaluate(f"{name} {args.unstructured:.0%} (mask)", masked,
                 {"plan_s": round(time.perf_counter() - t0, 1), "search_tokens": 0,
                  "weights_zeroed": args.unstructured})  # fmt: skip
    (args.out / "results.json").write_text(json.dumps({"settings": {k: str(v) for k, v in
                                                       vars(args).items()}, "runs": runs},
                                                      indent=2))  # fmt: skip
    print(table(runs))


def table(runs: list[dict]) -> str:
    rows = ["| strategy | block params kept | held-out ppl | plan wall s | search tokens | "
            "KL uniform -> found |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        kl = f"{r['kl_uniform']:.4f} -> {r['kl_found']:.4f}" if "kl_found" in r else ""
        tokens = r.get("search_tokens", "")
        kept = r["block_params_kept"] * (1 - r.get("weights_zeroed", 0))  # masks: non-zeros
        rows.append(f"| {r['strategy']} | {kept:.3f} | {r['ppl']:.2f} | "
                    f"{r.get('plan_s', '')} | {tokens} | {kl} |")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    main()
