"""Megatron-LM's checkpoint layout and arguments, both ways.

Megatron-LM's ``--load DIR`` reads ``DIR/latest_checkpointed_iteration.txt`` ("release" or an
iteration number) and then the dist checkpoint in ``DIR/release/`` or ``DIR/iter_NNNNNNN/``,
whose common state (``common.pt``) holds the training ``args`` (an ``argparse.Namespace``),
``iteration`` and ``checkpoint_version``. Without the tracker file it only warns and trains from
random weights. This tool writes that layout (``release``, so ``--finetune`` and
``--pretrained-checkpoint`` both take it), keeps ``megatron_prune.json`` and ``tokenizer/``
beside the tracker file, and reads Megatron-LM's own ``--save`` output.

The model's architecture travels as Megatron-LM arguments: :func:`megatron_lm_flags` gives the
command-line flags that rebuild a checkpoint's model in Megatron-LM (``--num-query-groups``,
``--kv-channels``, ``--untie-embeddings-and-output-weights``, ...), :func:`arch_from_args`
reads a Megatron-LM checkpoint's architecture back, refusing what this tool cannot express.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from megatron_prune.errors import CheckpointError, UserError
from megatron_prune.models.arch import ModelArch

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0


def is_megatron_lm_layout(path: str | Path) -> bool:
    return (Path(path) / TRACKER_FILE).is_file()


def tensor_directory(path: str | Path) -> Path:
    """The folder holding the dist checkpoint's tensors: ``release/`` or ``iter_NNNNNNN/`` of a
    Megatron-LM layout, or ``path`` itself (checkpoints written before this layout)."""
    path = Path(path)
    tracker = path / TRACKER_FILE
    if not tracker.is_file():
        return path
    text = tracker.read_text().strip()
    if text == RELEASE:
        return path / RELEASE
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(
            f"{tracker} holds {text!r}, neither 'release' nor an iteration number"
        ) from None
    return path / f"iter_{iteration:07d}"


def dist_checkpoint_directory(path: str | Path) -> Path:
    """The folder of ``path``'s dist checkpoint (see :func:`tensor_directory`), refusing what
    holds none: Megatron-LM's legacy per-rank format (with the way out) or no metadata.json."""
    directory = tensor_directory(path)
    if directory.is_dir() and any(directory.glob("mp_rank_*")):
        raise CheckpointError(
            f"{directory} is a legacy Megatron-LM checkpoint (mp_rank_*/model_optim_rng.pt), "
            "and this step reads dist checkpoints only: run `megatron-prune convert "
            f"{Path(path)} NEW_CHECKPOINT` and use NEW_CHECKPOINT"
        )
    if not (directory / "metadata.json").is_file():
        raise CheckpointError(
            f"{directory} holds no Megatron dist checkpoint (metadata.json missing)"
        )
    return directory


# --------------------------------------------------------------------- architecture -> args


def _refuse_unexpressible(arch: ModelArch) -> None:
    problems = []
    if arch.post_norms:
        problems.append("sandwich post-norms (Megatron-LM's GPT layer has no post-norm slot)")
    if arch.heterogeneous:
        problems.append("per-layer widths")
    if arch.sliding_window is not None:
        problems.append("sliding-window layers with their own RoPE base")
    if arch.embedding_scale != 1.0:
        problems.append("a scaled embedding")
    if arch.activation != "silu":
        problems.append(f"the {arch.activation} activation")
    if problems:
        raise UserError(
            f"this {arch.family} model has no Megatron-LM GPT equivalent: "
            + "; ".join(problems)
        )


def megatron_lm_args(arch: ModelArch) -> dict[str, Any]:
    """The Megatron-LM argument values (``args.<name>``) that rebuild ``arch``."""
    _refuse_unexpressible(arch)
    return {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "group_query_attention": arch.num_query_groups != arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.head_dim,
        "normalization": "RMSNorm",
        "norm_epsilon": arch.norm_eps,
        "swiglu": True,
        "position_embedding_type": "rope",
        "rotary_base": int(arch.rope_theta) if arch.rope_theta.is_integer() else arch.rope_theta,
        "rotary_percent": 1.0,
        "add_bias_linear": False,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        "untie_embeddings_and_output_weights": not arch.tie_embeddings,
        "max_position_embeddings": arch.max_position_embeddings,
        "padded_vocab_size": arch.padded_vocab_size,
        "vocab_size": arch.vocab_size,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
    }


def megatron_lm_flags(arch: ModelArch) -> list[str]:
    """Megatron-LM command-line flags for ``arch`` (with ``--transformer-impl local`` or
    ``transformer_engine``). The vocabulary: Megatron-LM pads the tokenizer's size to a
    multiple of ``--make-vocab-size-divisible-by`` x TP; the flag printed reproduces this
    checkpoint's padded size at TP=1."""
    values = megatron_lm_args(arch)
    flags = []
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        flags += [f"--{name.replace('_', '-')}", str(values[name])]
    if values["group_query_attention"]:
        flags += ["--group-query-attention", "--num-query-groups", str(arch.num_query_groups)]
    flags += ["--kv-channels", str(arch.head_dim), "--normalization", "RMSNorm",
              "--norm-epsilon", repr(arch.norm_eps), "--swiglu",
              "--position-embedding-type", "rope", "--rotary-base", str(values["rotary_base"]),
              "--disable-bias-linear", "--max-position-embeddings",
              str(arch.max_position_embeddings),
              "--make-vocab-size-divisible-by", str(arch.vocab_pad_multiple),
              "--attention-dropout", "0.0", "--hidden-dropout", "0.0"]  # fmt: skip
    if arch.qkv_bias:
        flags.append("--add-qkv-bias")
    if arch.qk_norm:
        flags.append("--qk-layernorm")
    if not arch.tie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def common_state(arch: ModelArch, layout: dict[str, Any]) -> dict[str, Any]:
    """What Megatron-LM keeps in a checkpoint's common state: its args, iteration, version."""
    values = megatron_lm_args(arch)
    values.update(
        tensor_model_parallel_size=layout.get("tp", 1),
        pipeline_model_parallel_size=layout.get("pp", 1),
        virtual_pipeline_model_parallel_size=layout.get("vpp"),
        ckpt_format="torch_dist",
        iteration=0,
    )
    return {
        "args": argparse.Namespace(**values),
        "iteration": 0,
        "checkpoint_version": CHECKPOINT_VERSION,
    }


def write_tracker(directory: Path) -> None:
    """The tracker file that makes ``directory`` a Megatron-LM ``--load`` folder."""
    from megatron_prune.checkpoint.atomic import write_text_atomic

    write_text_atomic(directory / TRACKER_FILE, RELEASE + "\n")


# --------------------------------------------------------------------- args -> architecture

_UNSUPPORTED = (
    ("num_experts", lambda v: v, "mixture of experts (--num-experts)"),
    ("multi_latent_attention", lambda v: v, "multi-latent attention"),
    ("add_bias_linear", lambda v: v, "biases on every linear layer (--add-bias-linear)"),
    ("position_embedding_type", lambda v: v not in (None, "rope"),
     "position embeddings other than RoPE"),  # fmt: skip
    ("normalization", lambda v: v not in (None, "RMSNorm"), "LayerNorm (only RMSNorm models)"),
    ("swiglu", lambda v: v is False, "a non-gated MLP (only SwiGLU models)"),
    ("rotary_percent", lambda v: v not in (None, 1.0), "partial rotary embeddings"),
    ("apply_layernorm_1p", lambda v: v, "zero-centred layernorm (--apply-layernorm-1p)"),
    ("rope_scaling", lambda v: v, "RoPE scaling"),
    ("heterogeneous_layers_config_path", lambda v: v, "heterogeneous layer configs"),
)


def arch_from_args(args: Any, vocab_size: int | None = None) -> ModelArch:
    """The architecture of a Megatron-LM checkpoint from its saved ``args``."""
    refused = [what for name, bad, what in _UNSUPPORTED if bad(getattr(args, name, None))]
    if refused:
        raise CheckpointError(
            "this Megatron-LM checkpoint uses what megatron-prune cannot convert: "
            + "; ".join(refused)
        )
    heads = args.num_attention_heads
    groups = args.num_query_groups if getattr(args, "group_query_attention", False) else heads
    padded = getattr(args, "padded_vocab_size", None)
    if padded is None:
        raise CheckpointError("the checkpoint's args have no padded_vocab_size")
    qk_norm = bool(getattr(args, "qk_layernorm", False))
    qkv_bias = bool(getattr(args, "add_qkv_bias", False))
    family = "qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"
    true_vocab = vocab_size or _args_vocab(args) or padded
    return ModelArch.from_dict({
        "family": family,
        "num_layers": args.num_layers,
        "hidden_size": args.hidden_size,
        "ffn_hidden_size": args.ffn_hidden_size,
        "num_attention_heads": heads,
        "num_query_groups": groups,
        "head_dim": getattr(args, "kv_channels", None) or args.hidden_size // heads,
        "vocab_size": true_vocab,
        "vocab_pad_multiple": _pad_multiple(true_vocab, padded),
        "norm_eps": float(getattr(args, "norm_epsilon", 1e-5)),
        "rope_theta": float(getattr(args, "rotary_base", 10000)),
        "activation": "silu",
        "tie_embeddings": not getattr(args, "untie_embeddings_and_output_weights", False),
        "qkv_bias": qkv_bias,
        "qk_norm": qk_norm,
        "max_position_embeddings": getattr(args, "max_position_embeddings", 4096),
    })  # fmt: skip


def _args_vocab(args: Any) -> int | None:
    """The tokenizer's vocabulary as the args give it. ``--vocab-size`` is the tokenizer's size,
    except for NullTokenizer, which adds its end-of-document token after the last id
    (megatron/training/tokenizer/tokenizer.py, ``_NullTokenizer.vocab_size``)."""
    size = getattr(args, "vocab_size", None)
    if size is not None and getattr(args, "tokenizer_type", None) == "NullTokenizer":
        return int(size) + 1
    return size


def _pad_multiple(vocab: int, padded: int) -> int:
    """A padding multiple that takes ``vocab`` to ``padded`` (Megatron-LM pads to a multiple of
    make_vocab_size_divisible_by x TP; any multiple with the same result will do)."""
    if padded < vocab:
        raise CheckpointError(f"padded vocabulary {padded} is smaller than the vocabulary {vocab}")
    for multiple in (128, 64, 32, 16, 8, 4, 2, 1):
        if padded % multiple == 0 and -(-vocab // multiple) * multiple == padded:
            return multiple
    return padded


# --------------------------------------------------------------------- reading a checkpoint


def saved_args(path: str | Path) -> Any:
    """The ``args`` Megatron-LM stored in a checkpoint's common state."""
    from megatron.core.dist_checkpointing import load_common_state_dict

    directory = dist_checkpoint_directory(path)
    try:
        common = load_common_state_dict(directory)
    except Exception as err:  # an unpicklable or damaged common.pt
        raise CheckpointError(f"{directory}: cannot read common.pt ({err})") from err
    args = common.get("args") if isinstance(common, dict) else None
    if args is None:
        raise CheckpointError(
            f"{directory}: no Megatron-LM args in the checkpoint's common state, so its "
            "architecture is unknown"
        )
    return args


def find_tokenizer(path: str | Path, args: Any, tokenizer: str | Path | None) -> Path | None:
    """A Hugging Face tokenizer folder for a Megatron-LM checkpoint: ``tokenizer`` if given,
    else ``args.tokenizer_model`` when it names a local folder with tokenizer.json."""
    for candidate in (tokenizer, getattr(args, "tokenizer_model", None)):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate).resolve()
    if tokenizer:
        raise UserError(f"--tokenizer {tokenizer} has no tokenizer.json")
    return None


def read_meta(path: str | Path, tokenizer: str | Path | None = None):
    """A ``CheckpointMeta`` for a Megatron-LM checkpoint that has no megatron_prune.json."""
    from tokenizers import Tokenizer

    from megatron_prune.checkpoint import megatron_lm_legacy
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.checkpoint.sources import tokenizer_record

    legacy = megatron_lm_legacy.is_legacy(tensor_directory(path))
    args = megatron_lm_legacy.saved_args(tensor_directory(path)) if legacy else saved_args(path)
    folder = find_tokenizer(path, args, tokenizer)
    vocab = None
    record: dict[str, Any] = {}
    if folder is not None:
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
        record = {**tokenizer_record(folder), "path": str(folder)}
    arch = arch_from_args(args, vocab)
    layout = {"tp": getattr(args, "tensor_model_parallel_size", 1),
              "pp": getattr(args, "pipeline_model_parallel_size", 1),
              "vpp": getattr(args, "virtual_pipeline_model_parallel_size", None),
              "sequence_parallel": False}  # fmt: skip
    kind = "megatron-lm-legacy" if legacy else "megatron-lm"
    return CheckpointMeta(arch=arch, layout=layout, tokenizer=record,
                          provenance={"source": f"{kind}:{path}"})  # fmt: skip
