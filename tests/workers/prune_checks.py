"""Model-level pruning checks in one torchrun launch (2 ranks), through the prune command.

usage: prune_checks.py WORKDIR   (the `scored` fixture's folder: ckpt/, ref/, tp2/ scores)
"""

import json
import sys
from pathlib import Path

import torch
import yaml


def prune(work: Path, name: str, scores: str, target: dict, *flags: str) -> Path:
    from megatron_prune.cli import build_parser

    (work / f"{name}.yaml").write_text(yaml.safe_dump(target))
    argv = ["prune", str(work / "ckpt"), "--scores", str(work / scores),
            "--target", str(work / f"{name}.yaml"), "--out", str(work / name),
            "--overwrite", *flags]  # fmt: skip
    args = build_parser().parse_args(argv)
    args.module.run(args)
    return work / name


def logits(ckpt: Path, tokens: torch.Tensor, skip: int | None = None) -> torch.Tensor:
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import full_logits

    initialize(ParallelLayout(), "cpu")
    model = load_model(ckpt)
    handle = None
    if skip is not None:

        def bypass(_m, args, kwargs, output):
            return (args[0] if args else kwargs["hidden_states"], output[1])

        handle = (
            model.chunks[0].decoder.layers[skip].register_forward_hook(bypass, with_kwargs=True)
        )
    out = full_logits(model.chunks, tokens, model.arch.vocab_size)
    if handle is not None:
        handle.remove()
    return out


def main() -> None:
    from megatron_prune.commands.convert import megatron_whole_state

    work = Path(sys.argv[1])
    tokens = torch.randint(0, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    report = {}
    source = logits(work / "ckpt", tokens)

    same = prune(work, "identity", "ref", {}, "--tp", "2")
    report["identity_equal"] = bool(torch.equal(logits(same, tokens), source))

    dropped = prune(work, "drop1", "ref", {"drop_layers": [1]})
    report["drop_vs_skip_max_diff"] = float(
        (logits(dropped, tokens) - logits(work / "ckpt", tokens, skip=1)).abs().max()
    )

    target = {"hidden_size": 48, "ffn_hidden_size": 64, "num_attention_heads": 2,
              "num_query_groups": 2, "num_layers": 3}  # fmt: skip
    a = prune(work, "from_tp1_at_tp1", "ref", target, "--clap", "--slnp")
    b = prune(work, "from_tp2_at_tp2", "tp2", target, "--clap", "--slnp", "--tp", "2")
    sa, sb = megatron_whole_state(a), megatron_whole_state(b)
    report["layouts_keys_equal"] = sorted(sa) == sorted(sb)
    report["layouts_unequal"] = [k for k in sa if not torch.equal(sa[k], sb[k])]

    absorbed = prune(work, "absorbed", "ref", target, "--clap", "--slnp", "--absorb-post-norms")
    out = logits(absorbed, tokens)
    report["absorbed_finite"] = bool(torch.isfinite(out).all())
    report["absorbed_meta"] = json.loads((absorbed / "megatron_prune.json").read_text())["arch"][
        "post_norms"
    ]
    if torch.distributed.get_rank() == 0:
        (work / "prune_report.json").write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
