"""The supported model families: how each reads and writes a Hugging Face config, and one weight
table per family (the rules of :mod:`megatron_prune.models.weight_map`).

Behaviour follows the architecture record (post-norms, QK-norm, biases), never a family's name;
the family only says how its configs and tensor names are spelt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_prune.models.arch import ArchError, ModelArch
from megatron_prune.models.weight_map import Copy, FuseGateUp, FuseQKV, Rule, expand_rules

HFConfig = dict[str, Any]

# ---------------------------------------------------------------------------- weight tables

_L = "model.layers.{i}."
_M = "decoder.layers.{i}."


def decoder_rules(arch: ModelArch, sandwich_names: bool = False) -> list[Rule]:
    """The weight table of a HF-style decoder (Llama/Qwen/Gemma naming) for ``arch``.

    ``sandwich_names``: the family spells its pre-MLP norm ``pre_feedforward_layernorm`` (Gemma,
    Pangu) even when the model has no post-norms (absorbed); otherwise the pre-MLP norm is
    ``post_attention_layernorm`` unless the model has post-norms.
    """
    attn = _M + "self_attention."
    layer: list[Rule] = [
        Copy(_M + "input_layernorm.weight", _L + "input_layernorm.weight"),
        FuseQKV(
            attn + "linear_qkv.weight",
            _L + "self_attn.q_proj.weight",
            _L + "self_attn.k_proj.weight",
            _L + "self_attn.v_proj.weight",
        ),
        Copy(attn + "linear_proj.weight", _L + "self_attn.o_proj.weight"),
        FuseGateUp(
            _M + "mlp.linear_fc1.weight", _L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"
        ),
        Copy(_M + "mlp.linear_fc2.weight", _L + "mlp.down_proj.weight"),
    ]
    if arch.qkv_bias:
        layer.append(
            FuseQKV(
                attn + "linear_qkv.bias",
                _L + "self_attn.q_proj.bias",
                _L + "self_attn.k_proj.bias",
                _L + "self_attn.v_proj.bias",
            )
        )
    if arch.qk_norm:
        layer += [
            Copy(attn + "q_layernorm.weight", _L + "self_attn.q_norm.weight"),
            Copy(attn + "k_layernorm.weight", _L + "self_attn.k_norm.weight"),
        ]
    if arch.post_norms or sandwich_names:
        # Sandwich naming: HF's "post_attention_layernorm" *is* the post-attention norm here,
        # while in a pre-norm model the same name is the pre-MLP norm.
        layer.append(Copy(_M + "pre_mlp_layernorm.weight", _L + "pre_feedforward_layernorm.weight"))
    if arch.post_norms:
        layer += [
            Copy(attn + "linear_proj.post_norm.weight", _L + "post_attention_layernorm.weight"),
            Copy(_M + "mlp.linear_fc2.post_norm.weight", _L + "post_feedforward_layernorm.weight"),
        ]
    if not (arch.post_norms or sandwich_names):
        layer.append(Copy(_M + "pre_mlp_layernorm.weight", _L + "post_attention_layernorm.weight"))
    other: list[Rule] = [
        Copy("embedding.word_embeddings.weight", "model.embed_tokens.weight", vocab=True),
        Copy("decoder.final_layernorm.weight", "model.norm.weight"),
    ]
    if not arch.tie_embeddings:
        other.append(Copy("output_layer.weight", "lm_head.weight", vocab=True))
    return expand_rules(layer, other, arch.num_layers)


# ---------------------------------------------------------------------------- configs


def _rope_theta(cfg: HFConfig, key: str | None = None, default: float = 10000.0) -> float:
    params = cfg.get("rope_parameters") or {}
    if key is not None:
        params = params.get(key) or {}
    scaling = cfg.get("rope_scaling")
    if (params.get("rope_type") or "default") != "default" or (
        scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")
    ):
        raise ArchError("RoPE scaling is not supported yet; only plain RoPE models convert")
    return float(params.get("rope_theta", cfg.get("rope_theta", default)))


def _common(cfg: HFConfig, family: str) -> dict[str, Any]:
    heads = cfg["num_attention_heads"]
    if cfg.get("mlp_bias"):
        raise ArchError(f"{family}: MLP biases are not supported")
    return dict(
        family=family,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        vocab_size=cfg["vocab_size"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
    )


def _common_hf(arch: ModelArch) -> HFConfig:
    return {
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "rms_norm_eps": arch.norm_eps,
        "tie_word_embeddings": arch.tie_embeddings,
        "max_position_embeddings": arch.max_position_embeddings,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }


def _llama_arch(cfg: HFConfig, family: str = "llama", **extra: Any) -> ModelArch:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ArchError(f"{family}: activation {cfg['hidden_act']!r} unsupported (want silu)")
    return ModelArch(
        **_common(cfg, family), rope_theta=_rope_theta(cfg), activation="silu", **extra
    )


def _llama_hf(arch: ModelArch, model_type: str, architecture: str, **extra: Any) -> HFConfig:
    return {
        "architectures": [architecture],
        "model_type": model_type,
        **_common_hf(arch),
        "hidden_act": "silu",
        "rope_theta": arch.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        **extra,
    }


def _qwen2_arch(cfg: HFConfig) -> ModelArch:
    if cfg.get("use_sliding_window"):
        raise ArchError("qwen2: sliding-window attention is not supported")
    return _llama_arch(cfg, "qwen2", qkv_bias=True)


def _gemma3_arch(cfg: HFConfig) -> ModelArch:
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(cap) is not None:
            raise ArchError(f"gemma3: {cap} is not supported")
    if cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ArchError("gemma3: only the gelu_pytorch_tanh activation is supported")
    n = cfg["num_hidden_layers"]
    pattern = cfg.get("sliding_window_pattern", 6)
    types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)
    ]
    globals_ = [i + 1 for i, t in enumerate(types) if t == "full_attention"]
    every = globals_[0] if globals_ else n + 1
    periodic = globals_ == list(range(every, n + 1, every))
    local_layers = None if periodic else tuple(t == "sliding_attention" for t in types)
    return ModelArch(
        **_common(cfg, "gemma3"),
        rope_theta=_rope_theta(cfg, "full_attention", 1_000_000.0),
        local_rope_theta=_rope_theta(cfg, "sliding_attention", 10_000.0),
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        zero_centered_gamma=True,
        embedding_scale=math.sqrt(cfg["hidden_size"]),
        softmax_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        sliding_window=cfg.get("sliding_window", 4096),
        global_every=every if periodic else None,
        local_layers=local_layers,
        needs_bos=True,
    )


def _gemma3_hf(arch: ModelArch) -> HFConfig:
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **_common_hf(arch),
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": round((arch.softmax_scale or arch.head_dim**-0.5) ** -2),
        "sliding_window": arch.sliding_window,
        "layer_types": [
            "sliding_attention" if arch.is_local_layer(i) else "full_attention"
            for i in range(arch.num_layers)
        ],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": arch.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": arch.local_rope_theta},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


def _sandwich_rules(arch: ModelArch) -> list[Rule]:
    return decoder_rules(arch, sandwich_names=True)


# What a stock transformers class cannot express goes under this config.json key, read by the
# model class we write next to the weights (models/hf_remote_code.py, trust_remote_code=True):
# "layer_widths": one dict of config overrides per layer (heterogeneous models);
# "identity_modules": decoder-layer modules that become identities (absorbed post-norms);
# "free_head_dim": true when some layer's head count does not divide hidden_size (the stock
# config class refuses that even with an explicit head_dim; ours accepts it). The remote code
# always brings its own config class too (REMOTE_CONFIG).
EXPORT_KEY = "megatron_prune"
REMOTE_CLASS = "MegatronPruneForCausalLM"
REMOTE_CONFIG = "MegatronPruneConfig"
REMOTE_MODULE = "modeling_megatron_prune"
_PER_LAYER_HF = {  # our per-layer width -> its HF config name
    "ffn_hidden_size": "intermediate_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
}
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Family:
    """How one family's checkpoints are spelt. ``hf_model_types`` are the config ``model_type``
    values it accepts; the first is the one it writes."""

    name: str
    hf_model_types: tuple[str, ...]
    arch_from_hf: Callable[[HFConfig], ModelArch]
    hf_from_arch: Callable[[ModelArch], HFConfig]
    rules: Callable[[ModelArch], list[Rule]] = decoder_rules
    transformers_class: bool = True  # False: no transformers model class exists (pangu)
    # the post-norm modules of its HF decoder layer (sandwich families): the transformers class
    # always builds them, so absorbed models replace them by identities
    hf_post_norms: tuple[str, ...] = ()
    # its transformers config class refuses hidden_size % num_attention_heads != 0, even with
    # an explicit head_dim (transformers 5.23: Llama and Gemma 3; Qwen 2/3 accept it)
    hf_heads_divide_hidden: bool = False

    def read_hf_config(self, cfg: HFConfig) -> ModelArch:
        """The architecture of an HF config, including what our own exports add."""
        arch = self.arch_from_hf(cfg)
        extra = cfg.get(EXPORT_KEY) or {}
        data = arch.to_dict()
        if extra.get("layer_widths"):
            for ours, theirs in _PER_LAYER_HF.items():
                data[f"layer_{ours}"] = [w[theirs] for w in extra["layer_widths"]]
        if self.hf_post_norms and set(self.hf_post_norms) <= set(extra.get("identity_modules", ())):
            data["post_norms"] = False
        return ModelArch.from_dict(data)

    def write_hf_config(self, arch: ModelArch) -> HFConfig:
        """config.json for ``arch``: the stock class when it can express the model, else the
        stock class's config plus :data:`EXPORT_KEY` and an ``auto_map`` to our model class."""
        cfg = self.hf_from_arch(arch)
        extra: dict[str, Any] = {}
        if arch.heterogeneous:
            # global values: the stock class builds (then we replace) layers of this shape, so
            # it must be a valid pair; the widest layer's is
            widest = max(arch.all_widths(), key=lambda w: w.num_attention_heads)
            cfg["num_key_value_heads"] = widest.num_query_groups
            extra["layer_widths"] = [
                {theirs: getattr(w, ours) for ours, theirs in _PER_LAYER_HF.items()}
                for w in arch.all_widths()
            ]
        if self.hf_post_norms and not arch.post_norms:
            extra["identity_modules"] = list(self.hf_post_norms)
        if self.hf_heads_divide_hidden and any(
            arch.hidden_size % w.num_attention_heads for w in arch.all_widths()
        ):
            # Width pruning picks the hidden size freely (make demo: 512 channels, 9 heads):
            # the stock config refuses such a model, though its attention computes it as is.
            extra["free_head_dim"] = True
        if not extra:
            return cfg
        cfg[EXPORT_KEY] = {"base_class": cfg["architectures"][0], **extra}
        if self.transformers_class:
            cfg["architectures"] = [REMOTE_CLASS]
            cfg["auto_map"] = {
                "AutoConfig": f"{REMOTE_MODULE}.{REMOTE_CONFIG}",
                "AutoModelForCausalLM": f"{REMOTE_MODULE}.{REMOTE_CLASS}",
            }
        return cfg


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama",
            ("llama",),
            _llama_arch,
            lambda a: _llama_hf(
                a, "llama", "LlamaForCausalLM", attention_bias=False, mlp_bias=False
            ),
            hf_heads_divide_hidden=True,
        ),
        Family(
            "qwen2",
            ("qwen2",),
            _qwen2_arch,
            lambda a: _llama_hf(a, "qwen2", "Qwen2ForCausalLM", use_sliding_window=False),
        ),
        Family(
            "qwen3",
            ("qwen3",),
            lambda c: _llama_arch(c, "qwen3", qk_norm=True, qkv_bias=bool(c.get("attention_bias"))),
            lambda a: _llama_hf(
                a, "qwen3", "Qwen3ForCausalLM", attention_bias=a.qkv_bias, use_sliding_window=False
            ),
        ),
        Family(
            "gemma3",
            ("gemma3_text", "gemma3"),
            _gemma3_arch,
            _gemma3_hf,
            _sandwich_rules,
            hf_post_norms=_POST_NORMS,
            hf_heads_divide_hidden=True,
        ),
        Family(
            "pangu",
            ("pangu_sandwich",),
            lambda c: _llama_arch(c, "pangu", post_norms=True),
            lambda a: _llama_hf(a, "pangu_sandwich", "PanguSandwichForCausalLM"),
            _sandwich_rules,
            transformers_class=False,
            hf_post_norms=_POST_NORMS,
        ),
    )
}


def family_for_hf_config(cfg: HFConfig) -> Family:
    """The family that reads ``cfg`` (by its ``model_type``), or a clear error."""
    model_type = cfg.get("model_type")
    if model_type == "gemma3" and "text_config" in cfg:
        raise ArchError("gemma3: multimodal checkpoints are not supported; convert the text model")
    for fam in FAMILIES.values():
        if model_type in fam.hf_model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ArchError(f"model_type {model_type!r} is not supported; supported: {known}")


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ArchError(f"unknown family {name!r}; known: {sorted(FAMILIES)}") from None
