"""Tiny random Hugging Face checkpoints of every family, with weights scaled so logits are O(1)
and every norm has non-trivial gamma (a swapped norm mapping then changes the logits)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_prune.checkpoint import hf
from megatron_prune.models.families import get_family

COMMON = dict(
    vocab_size=250,  # padded to 256: exercises vocabulary padding
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
)


def hf_config(family: str, **overrides):
    """The tiny config of ``family``; ``overrides`` change COMMON's sizes (e.g. a smaller
    student sharing the teacher's vocabulary)."""
    import transformers as tf

    common = {**COMMON, **overrides}

    if family == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=True, rope_theta=500.0)
    if family == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**{**common, "head_dim": 24}, tie_word_embeddings=False)
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=20,
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            },
        )
    raise ValueError(family)


def perturb(model: torch.nn.Module, seed: int, zero_centered: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name:
                p.copy_((0.0 if zero_centered else 1.0) + 0.3 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise * (1.0 / p.shape[-1] ** 0.5))


def make_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers as tf

    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    cls = tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM
    model = cls.from_config(config) if cls is tf.AutoModelForCausalLM else cls(config)
    perturb(model, seed, zero_centered=family == "gemma3")
    return model.eval()


def save_hf_model(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    return folder


def save_reference_model(model: torch.nn.Module, arch, folder: Path) -> Path:
    """A model with no transformers class (pangu): our own HF-style folder."""
    state = {k: v for k, v in model.state_dict().items()}
    hf.write_folder(folder, get_family(arch.family).hf_from_arch(arch), state)
    return folder


def save_word_tokenizer(folder: Path, text: str, vocab_size: int = 250) -> None:
    """A word-level tokenizer over the most frequent words of ``text`` (ids < vocab_size), with
    <unk>, <bos> and <eos>, saved as Hugging Face tokenizer files in ``folder``."""
    import collections
    import json
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = collections.Counter(re.findall(r"\w+|[^\w\s]", text.lower()))
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": 2}
    for word, _ in words.most_common(vocab_size - len(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.normalizer = __import__("tokenizers").normalizers.Lowercase()
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def whole_state(family: str, seed: int = 0):
    """(whole Megatron tensors, arch) of a tiny random ``family`` model."""
    from megatron_prune.models.weight_map import hf_to_megatron

    model = make_hf_model(family, seed=seed)
    fam = get_family(family)
    arch = fam.arch_from_hf(hf_config(family).to_dict() | {"model_type": fam.hf_model_types[0]})
    hf = {
        k: v
        for k, v in model.state_dict().items()
        if not (arch.tie_embeddings and k == "lm_head.weight")
    }
    return hf_to_megatron(hf, fam.rules(arch), arch), arch


def random_scores(arch, seed: int = 0):
    """Random scores of every kind surgery reads, for ``arch`` (uniform)."""
    g = torch.Generator().manual_seed(seed)
    L, n, f, h = arch.num_layers, arch.num_attention_heads, arch.ffn_hidden_size, arch.hidden_size
    return {
        "channel/l1": torch.rand(h, generator=g), "head/l2": torch.rand(L, n, generator=g),
        "neuron/l2": torch.rand(L, f, generator=g),
        "layer/block_influence": torch.rand(L, generator=g),
        "post_norm/attn_inv_rms": torch.rand(L, generator=g) + 0.5,
        "post_norm/mlp_inv_rms": torch.rand(L, generator=g) + 0.5,
    }  # fmt: skip
