"""Model-level pruning checks in one torchrun launch (2 ranks), through the prune command.

usage: prune_checks.py WORKDIR   (the `scored` fixture's folder: ckpt/, ref/, tp2/ scores)
"""

import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file


def prune(work: Path, name: str, scores: str, target: dict, *flags: str) -> Path:
    from megatron_prune.cli import build_parser

    # one rank writes the target, the others wait: when every rank wrote it, one could read
    # another's half-written file (an empty target; the drop-vs-skip check was flaky)
    if torch.distributed.get_rank() == 0:
        (work / f"{name}.yaml").write_text(yaml.safe_dump(target))
    torch.distributed.barrier()
    argv = ["prune", str(work / "ckpt"), "--scores", str(work / scores),
            "--target", str(work / f"{name}.yaml"), "--out", str(work / name),
            "--overwrite", *flags]  # fmt: skip
    args = build_parser().parse_args(argv)
    args.module.run(args)
    return work / name


def whole_reference(work: Path, target: dict, **options) -> dict[str, torch.Tensor]:
    """The whole-model, one-process surgery (``surgery.prune_model``) of the same prune."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.importance.scoring import load_scores
    from megatron_prune.plan.target import load_target
    from megatron_prune.stages.convert import whole_state
    from megatron_prune.surgery.prune import PruneOptions, prune_model

    arch = CheckpointMeta.read(work / "ckpt").arch
    result = prune_model(whole_state(work / "ckpt"), arch, load_scores(work / "ref", arch),
                         load_target(target, arch), PruneOptions(**options))  # fmt: skip
    return result.state


def logits(
    ckpt: Path,
    tokens: torch.Tensor,
    skip: int | None = None,
    post_norm_scales: list[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Full logits of ``ckpt``; ``skip`` bypasses one layer; ``post_norm_scales`` (one
    (attention, MLP) inverse RMS per layer) replaces every post-norm RMSNorm(y) by Eq. 8's
    constant-scale stand-in y * inv_rms * gamma, which is what absorption folds into the
    projections: a sandwich model run so must give the absorbed model's logits."""
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import full_logits
    from megatron_prune.surgery.norms import gamma_of

    initialize(ParallelLayout(), "cpu")
    model = load_model(ckpt)
    handles = []
    if skip is not None:

        def bypass(_m, args, kwargs, output):
            return (args[0] if args else kwargs["hidden_states"], output[1])

        handles.append(
            model.chunks[0].decoder.layers[skip].register_forward_hook(bypass, with_kwargs=True)
        )
    if post_norm_scales is not None:
        layers = model.chunks[0].decoder.layers
        assert len(layers) == len(post_norm_scales)
        for layer, scales in zip(layers, post_norm_scales, strict=True):
            projections = (layer.self_attention.linear_proj, layer.mlp.linear_fc2)
            for proj, inv in zip(projections, scales, strict=True):
                gamma = gamma_of(proj.post_norm.weight.detach(), model.arch.zero_centered_gamma)
                scale = (inv * gamma).float()

                def constant(_m, inputs, _output, scale=scale):
                    return inputs[0] * scale.to(inputs[0].dtype)

                handles.append(proj.post_norm.register_forward_hook(constant))
    out = full_logits(model.chunks, tokens, model.arch.vocab_size)
    for handle in handles:
        handle.remove()
    return out


def main() -> None:
    from megatron_prune.stages.convert import whole_state

    work = Path(sys.argv[1])
    tokens = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    report = {}
    source = logits(work / "ckpt", tokens)

    same = prune(work, "identity", "ref", {}, "--tp", "2")
    report["identity_equal"] = bool(torch.equal(logits(same, tokens), source))

    dropped = prune(work, "drop1", "ref", {"drop_layers": [1]})
    drop_meta = json.loads((dropped / "megatron_prune.json").read_text())
    report["drop_info"] = {  # what the assertion message shows if the comparison fails
        "kept": drop_meta["provenance"]["kept_layers"],
        "local_layers": drop_meta["arch"]["local_layers"],
        "rank": torch.distributed.get_rank(),
    }
    report["drop_vs_skip_max_diff"] = float(
        (logits(dropped, tokens) - logits(work / "ckpt", tokens, skip=1)).abs().max()
    )

    target = {"hidden_size": 48, "ffn_hidden_size": 64, "num_attention_heads": 2,
              "num_query_groups": 2, "num_layers": 3}  # fmt: skip
    a = prune(work, "from_tp1_at_tp1", "ref", target, "--clap", "--slnp")
    b = prune(work, "from_tp2_at_tp2", "tp2", target, "--clap", "--slnp", "--tp", "2")
    sa, sb = whole_state(a), whole_state(b)
    report["layouts_keys_equal"] = sorted(sa) == sorted(sb)
    report["layouts_unequal"] = [k for k in sa if not torch.equal(sa[k], sb[k])]
    # surgery on the shards (each rank reads only its layers) equals the whole-model surgery
    two_layers = {**target, "num_layers": 2}  # PP=2 needs an even layer count
    c = prune(work, "from_tp1_at_pp2", "ref", two_layers, "--clap", "--slnp", "--pp", "2")
    reference = whole_reference(work, target, clap=True, slnp=True)
    reference_2 = whole_reference(work, two_layers, clap=True, slnp=True)
    report["shards_vs_whole_unequal"] = [
        f"{name}:{k}"
        for name, state, ref in (("tp1", sa, reference), ("tp2", sb, reference),
                                 ("pp2", whole_state(c), reference_2))  # fmt: skip
        for k in set(state) | set(ref)
        if k not in state or k not in ref or not torch.equal(state[k], ref[k])
    ]

    absorbed = prune(work, "absorbed", "ref", target, "--clap", "--slnp", "--absorb-post-norms")
    out = logits(absorbed, tokens)
    absorbed_meta = json.loads((absorbed / "megatron_prune.json").read_text())
    report["absorbed_meta"] = absorbed_meta["arch"]["post_norms"]
    # reference: the same prune without absorption (`a`, a sandwich model) with each kept
    # layer's post-norms replaced by their constant scales from the scores (original indices)
    scores = load_file(str(work / "ref" / "scores.safetensors"))
    kept = absorbed_meta["provenance"]["kept_layers"]
    attn_inv, mlp_inv = scores["post_norm/attn_inv_rms"], scores["post_norm/mlp_inv_rms"]
    scales = [(float(attn_inv[i]), float(mlp_inv[i])) for i in kept]
    stand_in = logits(a, tokens, post_norm_scales=scales)
    report["absorbed_vs_constant_scale_max_diff"] = float((out - stand_in).abs().max())
    report["absorbed_logit_scale"] = float(stand_in.abs().max())
    # and the sandwich itself differs (its post-norm inputs have no constant RMS): the
    # comparison above can tell absorbed from unabsorbed
    report["absorbed_vs_sandwich_max_diff"] = float((out - logits(a, tokens)).abs().max())
    if torch.distributed.get_rank() == 0:
        (work / "prune_report.json").write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
