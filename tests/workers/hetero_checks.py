"""Heterogeneous (per-layer width) models at the model level, in one torchrun launch (2 ranks):
pruned through the prune command, run at several layouts, resharded, trained one step at TP=1
and TP=2, exported to Hugging Face. Rank 0 writes WORKDIR/hetero/report.json; the Megatron
logits of the exported models go next to it for the test to compare with transformers.

usage: hetero_checks.py WORKDIR   (the `scored` fixture's folder: ckpt/, ref/, tp2/ scores)
"""

import json
import sys
from pathlib import Path

import torch

from tests.workers.prune_checks import prune

# Tiny gemma3 source: h=64, f=128, n=4 heads in g=2 groups, 4 layers.
# A: per-layer heads and FFN (groups stay even: TP=2 needs them so); runs at TP=2 and PP=2 x VPP=2.
TARGET_A = {"hidden_size": 48, "ffn_hidden_size": [64, 128, 32, 96],
            "num_attention_heads": [2, 4, 4, 2], "num_query_groups": 2}  # fmt: skip
# B: per-layer groups too (TP=1 only), post-norms absorbed; exported to Hugging Face.
TARGET_B = {"ffn_hidden_size": [32, 128, 64, 96], "num_attention_heads": [1, 4, 2, 4],
            "num_query_groups": [1, 2, 1, 2]}  # fmt: skip
# Llama: per-layer everything, exported to Hugging Face.
TARGET_LLAMA = {"ffn_hidden_size": [64, 128, 96, 32], "num_attention_heads": [2, 4, 1, 4],
                "num_query_groups": [1, 2, 1, 2]}  # fmt: skip
LAYOUTS = {
    "tp1": {},
    "tp2": {"tp": 2},
    "tp2_sp": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "pp2_vpp2": {"pp": 2, "vpp": 2},
}


def whole(ckpt: Path) -> dict[str, torch.Tensor]:
    from megatron_prune.stages.convert import whole_state

    return whole_state(ckpt)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def states_equal(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def whole_grads(chunk: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as a whole (TP-gathered) tensor; PP=1."""
    from megatron.core import parallel_state as ps

    from megatron_prune.checkpoint.sharding import parameters_with_split

    tp, group = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_group()
    out = {}
    for name, param, dim in parameters_with_split(chunk):
        g = param.grad.detach()
        if dim is None or tp == 1:
            out[name] = g.clone()
            continue
        pieces = [torch.empty_like(g) for _ in range(tp)]
        torch.distributed.all_gather(pieces, g.contiguous(), group=group)
        if name.endswith("mlp.linear_fc1.weight"):  # each rank holds [gate_r; up_r]
            halves = [p.chunk(2, dim=dim) for p in pieces]
            pieces = [h[0] for h in halves] + [h[1] for h in halves]
        out[name] = torch.cat(pieces, dim=dim)
    return out


def train_step(ckpt: Path, layout: dict, tokens: torch.Tensor) -> dict:
    """Loss, whole gradients, and the loss after one plain SGD step, at ``layout`` (PP=1; with
    DP=2 both ranks take the same batch, so no gradient reduction is needed)."""
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.distributed import ParallelLayout, initialize

    initialize(ParallelLayout(**layout), "cpu")
    chunk = load_model(ckpt).chunks[0]
    chunk.train()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand_as(inputs)

    def loss() -> torch.Tensor:
        return chunk(inputs, positions, attention_mask=None, labels=labels).float().mean()

    before = loss()
    before.backward()
    # what Megatron's finalize_model_grads adds at TP > 1 (no SP): QK-norm weights see only
    # their rank's heads, so their gradients are summed over the TP group
    from megatron.core import parallel_state as ps

    for name, param in chunk.named_parameters():
        if "q_layernorm" in name or "k_layernorm" in name:
            torch.distributed.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
    grads = whole_grads(chunk)
    torch.optim.SGD(chunk.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = loss()
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    return {"loss": float(before), "after": float(after), "norm": float(norm), "grads": grads}


def save_checkpoint(arch, state: dict, out: Path) -> None:
    """A checkpoint of whole tensors ``state``, written at TP=1 (collective)."""
    from megatron_prune.checkpoint.atomic import atomic_directory
    from megatron_prune.checkpoint.megatron_io import save_chunks
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.checkpoint.sharding import load_full_state
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.models.gpt import build_model

    initialize(ParallelLayout(), "cpu")
    chunks = build_model(arch, initialize=False)
    load_full_state(chunks, state)
    with atomic_directory(out, True) as scratch:
        save_chunks(chunks, scratch)
        if torch.distributed.get_rank() == 0:
            CheckpointMeta(arch=arch, layout=ParallelLayout().to_dict()).write(scratch)


def export(ckpt: Path, out: Path, tokens: torch.Tensor) -> dict:
    """Write ``ckpt`` as a Hugging Face folder, save its Megatron logits for the test, and read
    the folder back: the same architecture and tensors."""
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.stages.convert import to_hf
    from tests.workers.common import logits_at

    model, logits = logits_at(ckpt, {}, tokens)
    to_hf(open_source(str(ckpt)), out, overwrite=True)
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out.with_suffix(".logits.pt"))
    back = open_source(str(out))
    return {
        "arch_equal": back.arch == model.arch,
        "tensors_equal": states_equal(back.megatron_state(), whole(ckpt)),
    }


def main() -> None:
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.plan.target import load_target
    from megatron_prune.surgery.prune import prune_model
    from tests.tiny_models import random_scores, whole_state
    from tests.workers.common import logits_at

    work = Path(sys.argv[1])
    out = work / "hetero"
    out.mkdir(exist_ok=True)
    tokens = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    report: dict = {}

    # per-layer lists equal to the source: the source model, bit for bit
    source = logits_at(work / "ckpt", {}, tokens)[1]
    same = prune(work, "het_identity", "ref", {"ffn_hidden_size": [128] * 4,
                 "num_attention_heads": [4] * 4, "num_query_groups": [2] * 4})  # fmt: skip
    report["identity_equal"] = torch.equal(logits_at(same, {}, tokens)[1], source)
    report["identity_heterogeneous"] = CheckpointMeta.read(same).arch.heterogeneous

    # A: saved at TP=2, loaded at every layout
    a = prune(work, "het_a", "ref", TARGET_A, "--slnp", "--tp", "2")
    report["a_arch"] = CheckpointMeta.read(a).arch.to_dict()
    ref = logits_at(a, {}, tokens)[1]
    report["a_layouts"] = {n: max_diff(logits_at(a, lay, tokens)[1], ref) for n, lay in
                           LAYOUTS.items()}  # fmt: skip
    # resharded: A converted to TP=1 gives the same tensors, and the same logits at TP=2
    from tests.workers.common import convert

    convert(str(a), work / "het_a_tp1", {})
    report["reshard_tensors_equal"] = states_equal(whole(work / "het_a_tp1"), whole(a))
    report["reshard_tp2_logits_equal"] = torch.equal(
        logits_at(work / "het_a_tp1", {"tp": 2}, tokens)[1], logits_at(a, {"tp": 2}, tokens)[1]
    )
    # one training step at TP=1 and at TP=2
    t1, t2 = (train_step(a, lay, tokens) for lay in ({}, {"tp": 2}))
    report["train"] = {
        "loss": [t1["loss"], t2["loss"]], "after": [t1["after"], t2["after"]],
        "norm": [t1["norm"], t2["norm"]],
        "grad_keys_equal": sorted(t1["grads"]) == sorted(t2["grads"]),
        "grad_max_diff": max(max_diff(t1["grads"][k], t2["grads"][k]) for k in t1["grads"]),
    }  # fmt: skip

    # B: per-layer groups, absorbed post-norms, saved at PP=2; exported to Hugging Face
    b = prune(work, "het_b", "ref", TARGET_B, "--absorb-post-norms", "--pp", "2")
    ref = logits_at(b, {}, tokens)[1]
    report["b_pp2"] = max_diff(logits_at(b, {"pp": 2}, tokens)[1], ref)
    report["b_export"] = export(b, out / "gemma3_hf", tokens)

    # a heterogeneous llama (no sandwich) exported to Hugging Face
    state, arch = whole_state("llama")
    res = prune_model(state, arch, random_scores(arch), load_target(TARGET_LLAMA, arch))
    save_checkpoint(res.arch, res.state, work / "het_llama")
    report["llama_export"] = export(work / "het_llama", out / "llama_hf", tokens)

    torch.save(tokens, out / "tokens.pt")
    if torch.distributed.get_rank() == 0:
        (out / "report.json").write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
