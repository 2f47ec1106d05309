"""``bench`` at world size 2 (one torchrun launch): the KV-cache decode it times gives the
logits of full forwards at TP=2 (llama; gemma3 with sliding windows and local RoPE), and a
whole bench run at PP=2 (layer timings gathered from both stages, decode refused by name,
a pipelined training step). Rank 0 writes WORKDIR/report.json.

usage: bench_checks.py WORKDIR ARCH.yaml
"""

import json
import sys
from pathlib import Path

import torch

from megatron_prune import api
from megatron_prune.bench.measure import BenchOptions, decode
from megatron_prune.distributed import ParallelLayout, initialize
from megatron_prune.evaluate.forward import full_logits
from megatron_prune.models.arch import ModelArch
from megatron_prune.models.gpt import build_model

TINY = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
            num_query_groups=2, head_dim=16, vocab_size=250,
            max_position_embeddings=128)  # fmt: skip
ARCHS = {
    "llama": ModelArch(family="llama", **TINY),
    "gemma3": ModelArch(
        family="gemma3",
        **TINY,
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        zero_centered_gamma=True,
        embedding_scale=8.0,
        softmax_scale=0.2,
        sliding_window=5,
        global_every=2,
        local_rope_theta=50.0,
    ),  # fmt: skip
}


def decode_vs_forward() -> dict[str, float]:
    """Max |decode logits - full-forward logits| at TP=2, per family (12-token prompt, 6 steps)."""
    initialize(ParallelLayout(tp=2), "cpu")
    out = {}
    for name, arch in ARCHS.items():
        chunks = build_model(arch)
        g = torch.Generator().manual_seed(3)
        prompt = torch.randint(0, arch.vocab_size, (2, 12), generator=g)
        fed, logits, _ = decode(chunks[0], arch, prompt, 6)
        whole = full_logits(chunks, torch.cat([prompt, fed], 1), arch.vocab_size)
        out[name] = float((logits - whole[:, 12:]).abs().max())
        out[f"{name}_scale"] = float(whole.abs().max())
    return out


def main() -> None:
    work, arch_file = Path(sys.argv[1]), sys.argv[2]
    report = {"decode_max_abs_diff": decode_vs_forward()}
    options = BenchOptions(batch_size=2, seq_len=16, warmup=1, iters=1, decode_tokens=2)
    records = api.bench(shapes=[arch_file], options=options, layout=ParallelLayout(pp=2),
                        device="cpu")  # fmt: skip
    report["pp2"] = records[0]
    if torch.distributed.get_rank() == 0:
        (work / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
