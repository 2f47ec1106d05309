"""A megatron-prune checkpoint against megatron-core's own standard GPT model (the local spec
Megatron-LM builds with ``--transformer-impl local``), both ways, at TP=1 and TP=2.

usage: megatron_core_interop.py SPEC.json  (hf: a tiny HF folder; workdir; out: report path)

1. ``convert`` the HF folder; build the standard model from the Megatron-LM flags
   ``megatron_lm_flags`` prints (parsed here as Megatron-LM's arguments.py would); load our
   checkpoint into it with dist_checkpointing; compare its logits with ours.
2. Save the standard model as Megatron-LM's ``--save`` does (``iter_0000010/``, the tracker
   file, ``args`` in the common state, no megatron_prune.json), ``convert`` that back, and
   compare logits again.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def parse_flags(flags: list[str]) -> argparse.Namespace:
    """The subset of Megatron-LM's arguments.py that the printed flags use."""
    p = argparse.ArgumentParser()
    for name in ("num-layers", "hidden-size", "ffn-hidden-size", "num-attention-heads",
                 "num-query-groups", "kv-channels", "max-position-embeddings",
                 "make-vocab-size-divisible-by"):  # fmt: skip
        p.add_argument(f"--{name}", type=int)
    for name in ("norm-epsilon", "rotary-base", "attention-dropout", "hidden-dropout"):
        p.add_argument(f"--{name}", type=float)
    for name in ("normalization", "position-embedding-type"):
        p.add_argument(f"--{name}")
    for name in ("group-query-attention", "swiglu", "add-qkv-bias", "qk-layernorm",
                 "untie-embeddings-and-output-weights"):  # fmt: skip
        p.add_argument(f"--{name}", action="store_true")
    p.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    return p.parse_args(flags)


def standard_model(args: argparse.Namespace, padded_vocab: int):
    """megatron-core's GPTModel with get_gpt_layer_local_spec, configured from ``args`` the
    way Megatron-LM's core_transformer_config_from_args does."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert args.swiglu and args.normalization == "RMSNorm" and not args.add_bias_linear
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, layernorm_epsilon=args.norm_epsilon,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=args.add_qkv_bias, qk_layernorm=args.qk_layernorm,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )  # fmt: skip
    spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=args.qk_layernorm)
    return GPTModel(
        config, spec, vocab_size=padded_vocab, max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type="rope", rotary_base=int(args.rotary_base),
    ).eval()  # fmt: skip


def standard_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, position_ids, attention_mask=None)  # [b, s, V/tp]
    return gather_from_tensor_model_parallel_region(logits.float())[..., :vocab_size]


def legacy_checkpoint_logit_diff(ours: Path, legacy: Path, tokens: torch.Tensor) -> float:
    """Write ``ours`` as checkpoints of this tool were written before Megatron's key names and
    folder layout (norms under their module names, tensors at the top level), then compare
    the logits it loads with."""
    import shutil

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    from megatron_prune.checkpoint.megatron_io import legacy_norm_key, sharded_model_state
    from tests.workers.common import logits_at

    model, reference = logits_at(ours, {"tp": 1}, tokens)
    state = sharded_model_state(model.chunks)

    def old_key(value):
        if isinstance(value, ShardedTensor):
            value.key = legacy_norm_key(value.key)
        return value

    dict_list_map_inplace(old_key, state)
    if torch.distributed.get_rank() == 0:
        legacy.mkdir(parents=True, exist_ok=True)
        for name in ("megatron_prune.json", "tokenizer"):
            if (ours / name).is_dir():
                shutil.copytree(ours / name, legacy / name, dirs_exist_ok=True)
            elif (ours / name).is_file():
                shutil.copy2(ours / name, legacy / name)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(legacy))
    keys = dist_checkpointing.load_tensors_metadata(str(legacy))
    assert "decoder.layers.input_layernorm.weight" in keys  # really the old names
    _, loaded = logits_at(legacy, {"tp": 1}, tokens)
    return float((loaded - reference).abs().max())


def write_legacy(folder: Path, state: dict, arch, tp: int, pp: int = 1,
                 tokenizer: str | None = None) -> None:  # fmt: skip
    """Save this TP rank's ``state`` as Megatron-LM's --ckpt-format torch does: the tracker
    file and iter_0000010/mp_rank_TT[_PPP]/model_optim_rng.pt with args, iteration and model.
    With ``pp`` > 1 the (TP=1) state is split into stages with layers numbered per stage.
    ``tokenizer`` goes in the args as ``--tokenizer-model`` (a Hugging Face folder)."""
    import re

    from megatron.core import parallel_state

    from megatron_prune.checkpoint.megatron_lm_format import TRACKER_FILE, common_state

    args = common_state(arch, {"tp": tp, "pp": pp})["args"]
    args.ckpt_format = "torch"
    if tokenizer is not None:
        args.tokenizer_type, args.tokenizer_model = "HuggingFaceTokenizer", tokenizer
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    if parallel_state.get_data_parallel_rank() == 0:
        per_stage = arch.num_layers // pp
        for stage in range(pp):
            part = {}
            for key, value in state.items():
                match = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
                if match:
                    layer = int(match.group(1))
                    if layer // per_stage == stage:
                        part[f"decoder.layers.{layer % per_stage}.{match.group(2)}"] = value
                elif key.startswith("embedding.") and stage == 0:
                    part[key] = value
                elif not key.startswith("embedding.") and stage == pp - 1:
                    part[key] = value  # final norm, output layer
            if pp > 1 and arch.tie_embeddings and stage == pp - 1:
                part["output_layer.weight"] = state["embedding.word_embeddings.weight"].clone()
            name = f"mp_rank_{tp_rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
            rank_dir = folder / "iter_0000010" / name
            rank_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"args": args, "iteration": 10, "checkpoint_version": 3.0,
                        "model": part}, rank_dir / "model_optim_rng.pt")  # fmt: skip
        (folder / TRACKER_FILE).write_text("10")
    torch.distributed.barrier()


def convert_and_compare(source: Path, dst: Path, expected, tokens, tokenizer, arch) -> dict:
    """``convert`` a Megatron-LM checkpoint at TP=1; its logits against ``expected``."""
    from megatron_prune import api
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.distributed import ParallelLayout
    from tests.workers.common import logits_at

    api.convert(str(source), dst, layout=ParallelLayout(), overwrite=True, tokenizer=tokenizer)
    _, converted = logits_at(dst, {"tp": 1}, tokens)
    return {"max_diff": float((converted - expected).abs().max()),
            "arch_equal": CheckpointMeta.read(dst).arch == arch}  # fmt: skip


def legacy_everywhere(work: Path, tokens: torch.Tensor, text: str) -> dict:
    """Every command reads the TP=2 legacy checkpoint itself (tokenizer from its args), as it
    reads that checkpoint's conversion: loading at TP=1 and TP=2, perplexity, and score +
    prune at TP=2 give the same numbers for both."""
    from megatron_prune import api
    from megatron_prune.distributed import ParallelLayout
    from tests.workers.common import logits_at

    legacy, converted = work / "megatron_lm_torch_tp2", work / "from_torch_tp2"
    report = {}
    for tp in (1, 2):
        _, direct = logits_at(legacy, {"tp": tp}, tokens)
        _, via = logits_at(converted, {"tp": tp}, tokens)
        report[f"legacy_direct_tp{tp}"] = float((direct - via).abs().max())
    layout = ParallelLayout(tp=2)
    report["legacy_ppl"] = [
        api.perplexity(path, text, seq_len=16, max_tokens=256, layout=layout).ppl
        for path in (legacy, converted)
    ]
    target = {"hidden_size": 48, "ffn_hidden_size": 96}
    for name, path in (("legacy", legacy), ("converted", converted)):
        api.score(path, text, work / f"scores_{name}", samples=4, seq_len=16, layout=layout,
                  overwrite=True)  # fmt: skip
        api.prune(path, work / f"scores_{name}", target, work / f"pruned_{name}", layout=layout,
                  overwrite=True)  # fmt: skip
    _, direct = logits_at(work / "pruned_legacy", {"tp": 2}, tokens)
    _, via = logits_at(work / "pruned_converted", {"tp": 2}, tokens)
    report["legacy_pruned"] = float((direct - via).abs().max())
    return report


def main() -> None:
    from megatron.core import dist_checkpointing

    from megatron_prune import api
    from megatron_prune.checkpoint.megatron_lm_format import (
        TRACKER_FILE,
        common_state,
        megatron_lm_flags,
        tensor_directory,
    )
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.distributed import ParallelLayout, initialize
    from tests.workers.common import logits_at

    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["workdir"])
    tokens = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = work / "ours"
    api.convert(spec["hf"], ours, layout=ParallelLayout(), overwrite=True)
    arch = CheckpointMeta.read(ours).arch
    flags = megatron_lm_flags(arch)
    args = parse_flags(flags)
    report = {"flags": flags, "tracker": (ours / TRACKER_FILE).read_text().strip()}
    report["legacy_max_diff"] = legacy_checkpoint_logit_diff(ours, work / "legacy", tokens)
    for tp in (1, 2):
        _, reference = logits_at(ours, {"tp": tp}, tokens)
        initialize(ParallelLayout(tp=tp), "cpu")
        model = standard_model(args, arch.padded_vocab_size)
        state = dist_checkpointing.load(model.sharded_state_dict(), str(tensor_directory(ours)))
        model.load_state_dict(state, strict=False)
        missing = [k for k in model.state_dict() if not k.endswith("_extra_state")
                   and k not in state]  # fmt: skip
        got = standard_logits(model, tokens, arch.vocab_size)
        report[f"load_tp{tp}"] = {"missing": missing,
                                  "max_diff": float((got - reference).abs().max())}  # fmt: skip
        # Megatron-LM's --save of the standard model: iter_0000010/, tracker, args, no ours
        saved = work / f"megatron_lm_tp{tp}"
        if torch.distributed.get_rank() == 0:
            (saved / "iter_0000010").mkdir(parents=True, exist_ok=True)
        torch.distributed.barrier()
        common = common_state(arch, {"tp": tp, "pp": 1})
        common["iteration"] = 10
        dist_checkpointing.save({"model": model.sharded_state_dict(), **common},
                                str(saved / "iter_0000010"))  # fmt: skip
        if torch.distributed.get_rank() == 0:
            (saved / TRACKER_FILE).write_text("10")
        torch.distributed.barrier()
        back = work / f"back_tp{tp}"
        api.convert(str(saved), back, layout=ParallelLayout(tp=tp), overwrite=True,
                    tokenizer=spec["hf"])  # fmt: skip
        _, converted = logits_at(back, {"tp": tp}, tokens)
        report[f"convert_back_tp{tp}"] = float((converted - got).abs().max())
        report[f"back_arch_equal_tp{tp}"] = CheckpointMeta.read(back).arch == arch
        # the same model in Megatron-LM's legacy format (--ckpt-format torch), converted at TP=1
        legacy = work / f"megatron_lm_torch_tp{tp}"
        write_legacy(legacy, model.state_dict_for_save_checkpoint(), arch, tp=tp,
                     tokenizer=spec["hf"] if tp == 2 else None)  # fmt: skip
        report[f"legacy_tp{tp}"] = convert_and_compare(legacy, work / f"from_torch_tp{tp}",
                                                       got, tokens, spec["hf"], arch)  # fmt: skip
        if tp == 1:  # and split into two pipeline stages, as Megatron-LM numbers their layers
            legacy = work / "megatron_lm_torch_pp2"
            write_legacy(legacy, model.state_dict_for_save_checkpoint(), arch, tp=1, pp=2)
            report["legacy_pp2"] = convert_and_compare(legacy, work / "from_torch_pp2", got,
                                                       tokens, spec["hf"], arch)  # fmt: skip
    report.update(legacy_everywhere(work, tokens, spec["text"]))
    if torch.distributed.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(report, indent=2))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
