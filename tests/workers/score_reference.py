"""One rank: convert the tiny sandwich model, score it (uninterrupted, and stopped + resumed),
and compute every metric directly from activations captured with plain forward hooks.

usage: score_reference.py SPEC.json
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file


def direct_scores(model, arch, samples):
    """The metrics, from raw captured activations (no accumulation machinery)."""
    import torch.nn.functional as F

    chunk = model.chunks[0]
    cap: dict[str, list] = {}

    def keep(name, what):
        def hook(m, args, out):
            cap.setdefault(name, []).append((args[0] if what == "in" else out).detach().clone())

        return hook

    def keep_layer(name):
        def hook(m, args, kwargs, out):
            h_in = args[0] if args else kwargs["hidden_states"]
            cap.setdefault(name, []).append((h_in.detach().clone(), out[0].detach().clone()))

        return hook

    handles = []
    for i, layer in enumerate(chunk.decoder.layers):
        attn, mlp = layer.self_attention, layer.mlp
        norms = {
            "input": layer.input_layernorm,
            "pre_mlp": layer.pre_mlp_layernorm,
            "post_attn": attn.linear_proj.post_norm,
            "post_mlp": mlp.linear_fc2.post_norm,
        }
        for kind, norm in norms.items():
            handles.append(norm.register_forward_hook(keep(f"norm_out.{kind}.{i}", "out")))
            handles.append(norm.register_forward_hook(keep(f"norm_in.{kind}.{i}", "in")))
        handles.append(attn.linear_proj.register_forward_hook(keep(f"proj_in.{i}", "in")))
        handles.append(mlp.linear_fc2.register_forward_hook(keep(f"fc2_in.{i}", "in")))
        handles.append(layer.register_forward_hook(keep_layer(f"layer.{i}"), with_kwargs=True))
    handles.append(
        chunk.decoder.final_layernorm.register_forward_hook(keep("norm_out.final.0", "out"))
    )
    with torch.no_grad():
        for row in samples.split(1):
            chunk(row, torch.arange(row.shape[1]).unsqueeze(0), attention_mask=None)
    for h in handles:
        h.remove()

    L, n, g, d = arch.num_layers, arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    out = {}
    norm_outs = [k for k in cap if k.startswith("norm_out.")]
    out["channel/l1"] = sum(torch.cat(cap[k]).abs().sum((0, 1)) for k in norm_outs)
    # minitron: per norm, per sample mean_t |y|, L2 over samples, then summed over norms
    out["channel/minitron"] = sum(
        torch.stack([y.abs().mean(0)[0] for y in cap[k]]).norm(dim=0) for k in norm_outs
    )
    heads, neurons, minih, minin, bi, wanda_h, wanda_n, flap_h, flap_n = ([] for _ in range(9))
    inv = {"attn": [], "mlp": []}
    for i, layer in enumerate(chunk.decoder.layers):
        x = torch.cat(cap[f"proj_in.{i}"]).reshape(-1, n * d)  # [T, n*d]
        z = torch.cat(cap[f"fc2_in.{i}"]).reshape(-1, arch.ffn_hidden_size)
        heads.append(x.view(-1, n, d).pow(2).sum((0, 2)).sqrt())
        neurons.append(z.norm(dim=0))
        minih.append(
            torch.stack(
                [c.view(c.shape[0], n, d).norm(dim=-1).mean(0) for c in cap[f"proj_in.{i}"]]
            ).norm(dim=0)
        )
        minin.append(torch.stack([c.abs().mean(0)[0] for c in cap[f"fc2_in.{i}"]]).norm(dim=0))
        wp = layer.self_attention.linear_proj.weight.detach().float()
        w2 = layer.mlp.linear_fc2.weight.detach().float()
        wanda_h.append((x.norm(dim=0) * wp.abs().sum(0)).view(n, d).sum(-1))
        wanda_n.append(z.norm(dim=0) * w2.abs().sum(0))
        flap_h.append((x.var(0, unbiased=False) * wp.pow(2).sum(0)).view(n, d).sum(-1))
        flap_n.append(z.var(0, unbiased=False) * w2.pow(2).sum(0))
        pairs = cap[f"layer.{i}"]
        cos = torch.cat([F.cosine_similarity(a, b, dim=-1).flatten() for a, b in pairs])
        bi.append(1 - cos.mean())
        for kind in ("attn", "mlp"):
            xs = torch.cat(cap[f"norm_in.post_{kind}.{i}"])
            inv[kind].append(torch.rsqrt(xs.pow(2).mean(-1) + arch.norm_eps).mean())
    out["head/l2"] = torch.stack(heads)
    out["group/mean_head"] = out["head/l2"].view(L, g, n // g).mean(-1)
    out["group/l2"] = out["head/l2"].pow(2).view(L, g, n // g).sum(-1).sqrt()
    out["neuron/l2"] = torch.stack(neurons)
    out["head/minitron"], out["neuron/minitron"] = torch.stack(minih), torch.stack(minin)
    out["head/wanda"], out["neuron/wanda"] = torch.stack(wanda_h), torch.stack(wanda_n)
    out["head/flap"], out["neuron/flap"] = torch.stack(flap_h), torch.stack(flap_n)
    h = arch.hidden_size
    for key, source in (("qkv", "norm_out.input"), ("fc1", "norm_out.pre_mlp"),
                        ("proj", "proj_in"), ("fc2", "fc2_in")):  # fmt: skip
        columns = [torch.cat(cap[f"{source}.{i}"]) for i in range(L)]
        out[f"input_norm/{key}"] = torch.stack([c.flatten(0, 1).norm(dim=0) for c in columns])
    assert out["input_norm/qkv"].shape[1] == h
    out["layer/block_influence"] = torch.stack(bi)
    out["post_norm/attn_inv_rms"] = torch.stack(inv["attn"])
    out["post_norm/mlp_inv_rms"] = torch.stack(inv["mlp"])
    return {k: v.float().contiguous() for k, v in out.items()}


def main() -> None:
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.importance.calibration import packed_samples
    from megatron_prune.importance.scoring import ScoreJob, run_score_job
    from megatron_prune.stages.convert import to_megatron

    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["workdir"])
    to_megatron(open_source(spec["hf"]), work / "ckpt", ParallelLayout(), True, "cpu")
    layout = ParallelLayout()
    initialize(layout, "cpu")
    model = load_model(work / "ckpt")
    tok = load_tokenizer(work / "ckpt")
    job = ScoreJob(checkpoint=str(work / "ckpt"), out=str(work / "ref"), **spec["job"])
    run_score_job(job, model, tok, layout, resume=False, overwrite=True)
    stopped = replace(job, out=str(work / "resumed"), stop_after=2, save_every=1)
    assert not run_score_job(stopped, model, tok, layout, resume=False, overwrite=True)
    resumed = replace(stopped, stop_after=None)
    assert run_score_job(resumed, model, tok, layout, resume=True, overwrite=True)

    ids = tok.encode(Path(job.data).read_text())
    samples = packed_samples(ids, job.samples, job.seq_len, job.seed, tok.bos_id)
    save_file(direct_scores(model, model.arch, samples), str(work / "direct.safetensors"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
