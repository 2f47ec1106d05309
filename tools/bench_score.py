"""Benchmark: calibration throughput with every default scoring hook / plain forward throughput
(target >= 0.95), SmolLM2-135M, same run, alternating, best of N.

usage: python tools/bench_score.py [--samples 4] [--seq-len 512] [--repeats 3] [--device cpu]
       [--metrics channel head group neuron layer post_norm]
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print the top kernels, hooked")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--metrics", nargs="+", default=["channel", "head", "group", "neuron", "layer", "post_norm"]
    )
    parser.add_argument("--checkpoint", default=None, help="default: convert SmolLM2 once")
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="SmolLM2's shape with random weights and tokens (machines without "
        "the model package); throughput does not depend on the weights",
    )
    args = parser.parse_args()

    import torch

    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.data.corpus import cache_dir, write_splits
    from megatron_prune.data.models import smollm2_135m_arch, smollm2_135m_gguf
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import forward_reduce
    from megatron_prune.importance.calibration import packed_samples
    from megatron_prune.importance.hooks import ImportanceHooks, RankView
    from megatron_prune.models.gpt import build_model
    from megatron_prune.stages.convert import to_megatron

    SMOLLM2 = smollm2_135m_arch()

    class RandomModel:
        def __init__(self, chunks):
            self.chunks, self.arch = chunks, SMOLLM2

    if args.random_init:
        accel = initialize(ParallelLayout(), args.device)
        device = accel.device(0)
        model = RandomModel(build_model(SMOLLM2, device=None if device.type == "cpu" else device))
        samples = torch.randint(0, SMOLLM2.vocab_size, (args.samples, args.seq_len))
    else:
        ckpt = args.checkpoint or cache_dir() / "models" / "smollm2_mcore"
        if args.checkpoint is None and not ckpt.exists():
            to_megatron(open_source(f"gguf:{smollm2_135m_gguf()}"), ckpt, ParallelLayout(),
                        False, args.device)  # fmt: skip
        accel = initialize(ParallelLayout(), args.device)
        device = accel.device(0)
        model = load_model(ckpt, device=None if device.type == "cpu" else device)
        tok = load_tokenizer(ckpt)
        calibration = write_splits(cache_dir() / "text")[0]
        ids = tok.encode(calibration.read_text()[:2_000_000])
        samples = packed_samples(ids, args.samples, args.seq_len, seed=0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(hooked: bool) -> float:
        hooks = None
        if hooked:
            hooks = ImportanceHooks(model.chunks, model.arch, set(args.metrics),
                                    RankView.current(False), seq_len=args.seq_len)  # fmt: skip
        sync()
        t0 = time.perf_counter()
        for batch in samples.split(args.micro_batch_size * 2):  # two micro-batches per call
            forward_reduce(model.chunks, batch, lambda logits: torch.zeros(len(logits)),
                           micro_batch_size=args.micro_batch_size)  # fmt: skip
            if hooks is not None:
                hooks.sums.flush()
        sync()
        elapsed = time.perf_counter() - t0
        if hooks is not None:
            hooks.remove()
        return samples.numel() / elapsed

    run(False)  # warm-up
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        for hooked in (False, True):
            with profile(activities=activities) as prof:
                run(hooked)
            key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(f"--- hooked={hooked}")
            print(prof.key_averages().table(sort_by=key, row_limit=14))
    plain, hooked = [], []
    for _ in range(args.repeats):
        plain.append(run(False))
        hooked.append(run(True))
    print(json.dumps({
        "device": str(device), "tokens_per_run": samples.numel(), "metrics": args.metrics,
        "micro_batch_size": args.micro_batch_size,
        "plain_tok_s": max(plain), "hooked_tok_s": max(hooked),
        "ratio": max(hooked) / max(plain),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
