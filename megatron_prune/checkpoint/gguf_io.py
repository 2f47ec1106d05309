"""GGUF files (llama.cpp) to Hugging Face-named fp32 tensors and a Hugging Face config.

GGUF stores tensors under llama.cpp names, quantized, with two layout changes this module undoes:
Llama's Q and K rows are permuted for llama.cpp's RoPE kernel, and Gemma's norm weights are
stored as 1 + w (Hugging Face stores w).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_prune.checkpoint.metadata import CheckpointError

# llama.cpp name -> Hugging Face name, per GGUF architecture; "{i}" is the layer.
_COMMON = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_NAMES = {
    "llama": {
        **_COMMON,
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    },
    "gemma3": {
        **_COMMON,
        "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
        "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
        # in GGUF's Gemma naming, post_attention_norm *is* the post-attention norm
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    },
}
SUPPORTED_ARCHITECTURES = tuple(sorted(_NAMES))


@dataclass
class GGUFModel:
    architecture: str
    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_name(arch: str, gguf_name: str) -> str:
    m = re.match(r"blk\.(\d+)\.(.*)", gguf_name)
    key = f"blk.{{i}}.{m.group(2)}" if m else gguf_name
    table = _NAMES[arch]
    if key not in table:
        raise CheckpointError(f"GGUF tensor {gguf_name!r} has no mapping for {arch!r}")
    return table[key].replace("{i}", m.group(1)) if m else table[key]


def _unpermute_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: per head it stores [even rows..., odd rows...] pairs as
    (d/2, 2) interleaved; Hugging Face uses the rotate-half order (2, d/2)."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _config(reader: Any, arch: str) -> dict[str, Any]:
    def g(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = g("vocab_size") or (len(tokens.data) if tokens is not None else None)
    cfg: dict[str, Any] = {
        "num_hidden_layers": int(g("block_count")),
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "vocab_size": int(vocab),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    theta = g("rope.freq_base")
    if arch == "llama":
        cfg.update(model_type="llama", hidden_act="silu", rope_theta=float(theta or 10000.0))
    else:  # gemma3: the GGUF leaves the local RoPE base and the layer pattern at their defaults
        cfg.update(
            model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=int(g("attention.sliding_window", 4096)),
            query_pre_attn_scalar=int(g("attention.key_length", 256)),
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": float(theta or 1e6)},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        )
    return cfg


def _open(path: Path) -> tuple[Any, str]:
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from err
    arch = _field(reader, "general.architecture")
    if arch not in _NAMES:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    return reader, arch


def read_gguf_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face config of a GGUF file, from its header only (no tensor is read)."""
    reader, arch = _open(Path(path))
    cfg = _config(reader, arch)
    cfg["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
    return cfg


def lazy_gguf_tensors(path: str | Path):
    """The GGUF file's tensors under Hugging Face names, each dequantized to fp32 (and put back
    in Hugging Face's layout) only when asked for."""
    import gguf

    from megatron_prune.checkpoint.lazy import LazyTensors

    reader, arch = _open(Path(path))
    cfg = _config(reader, arch)
    by_name = {_hf_name(arch, t.name): t for t in reader.tensors}

    def load(name: str) -> torch.Tensor:
        t = by_name[name]
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dims fastest-first
        w = torch.from_numpy(np.array(data, dtype=np.float32, copy=True).reshape(shape))
        if arch == "llama" and ".self_attn.q_proj." in name:
            w = _unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif arch == "llama" and ".self_attn.k_proj." in name:
            w = _unpermute_rope_rows(w, cfg["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # GGUF stores Gemma's gamma as 1 + w
        return w

    shapes = {n: tuple(int(s) for s in reversed(t.shape)) for n, t in by_name.items()}
    return LazyTensors(shapes, load, origin=str(path))


def read_gguf(path: str | Path) -> GGUFModel:
    """Dequantize every tensor of a GGUF file to fp32 under Hugging Face names."""
    reader, arch = _open(Path(path))
    cfg = _config(reader, arch)
    lazy = lazy_gguf_tensors(path)
    tensors = {name: lazy[name] for name in lazy}
    cfg["tie_word_embeddings"] = "lm_head.weight" not in tensors
    return GGUFModel(architecture=arch, hf_config=cfg, tensors=tensors)


def save_gguf_tokenizer(path: Path, out_dir: Path) -> None:
    """Rebuild the GGUF's tokenizer as Hugging Face tokenizer files in ``out_dir``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(out_dir))
