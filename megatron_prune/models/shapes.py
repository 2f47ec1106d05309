"""Named architectures of public models (shapes only, no weights), and arch files.

``bench --shape NAME`` and the benchmark tools build random weights of these shapes, so a speed
or memory figure needs no download and no checkpoint travelling to an accelerator. Values are
the models' published Hugging Face configs (RoPE scaling, which changes no cost, is left out);
the Minitron shapes are NVIDIA's width- and depth-pruned Llama-3.1-8B students
(Llama-3.1-Minitron-4B-Width-Base / -Depth-Base).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from megatron_prune.errors import ArchError, UserError
from megatron_prune.models.arch import ModelArch

_LLAMA3 = dict(family="llama", vocab_size=128256, rope_theta=500000.0,
               max_position_embeddings=131072, num_query_groups=8)  # fmt: skip
_LLAMA_8B = dict(_LLAMA3, num_attention_heads=32, head_dim=128, tie_embeddings=False)

SHAPES: dict[str, ModelArch] = {
    "smollm2-135m": ModelArch(
        family="llama", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
        num_attention_heads=9, num_query_groups=3, head_dim=64, vocab_size=49152,
        rope_theta=100000.0, tie_embeddings=True, max_position_embeddings=8192,
    ),
    "gemma3-270m": ModelArch(
        family="gemma3", num_layers=18, hidden_size=640, ffn_hidden_size=2048,
        num_attention_heads=4, num_query_groups=1, head_dim=256, vocab_size=262144,
        norm_eps=1e-6, rope_theta=1_000_000.0, local_rope_theta=10_000.0,
        activation="gelu_tanh", tie_embeddings=True, qk_norm=True, post_norms=True,
        zero_centered_gamma=True, embedding_scale=math.sqrt(640), softmax_scale=256**-0.5,
        sliding_window=512, global_every=6, needs_bos=True, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": ModelArch(
        **_LLAMA3, num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
        num_attention_heads=32, head_dim=64, tie_embeddings=True,
    ),
    "llama-3.2-3b": ModelArch(
        **_LLAMA3, num_layers=28, hidden_size=3072, ffn_hidden_size=8192,
        num_attention_heads=24, head_dim=128, tie_embeddings=True,
    ),
    "llama-3.1-8b": ModelArch(**_LLAMA_8B, num_layers=32, hidden_size=4096, ffn_hidden_size=14336),
    "minitron-4b-width": ModelArch(
        **_LLAMA_8B, num_layers=32, hidden_size=3072, ffn_hidden_size=9216
    ),
    "minitron-4b-depth": ModelArch(
        **_LLAMA_8B, num_layers=16, hidden_size=4096, ffn_hidden_size=14336
    ),
}  # fmt: skip


_FLOATS = {"norm_eps", "rope_theta", "embedding_scale", "softmax_scale", "local_rope_theta"}


def _yaml_float(key: str, value: object) -> object:
    """YAML 1.1 (PyYAML) reads ``1e-5`` (no dot) as a string: take it as the number meant."""
    if key in _FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ArchError(f"{key}: {value!r} is not a number") from None
    return value


def load_shape(spec: str | Path) -> ModelArch:
    """A named shape (:data:`SHAPES`) or an architecture file: YAML or JSON holding
    :class:`ModelArch`'s fields, or a mapping with an ``arch`` key (a checkpoint's
    ``megatron_prune.json`` is one)."""
    text = str(spec)
    if text in SHAPES:
        return SHAPES[text]
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--shape {text}: neither a known shape ({', '.join(SHAPES)}) nor an "
                        "architecture file (YAML with ModelArch's fields)")  # fmt: skip
    try:
        raw = path.read_text()
        data = json.loads(raw) if path.suffix == ".json" else yaml.safe_load(raw)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"--shape {text}: not readable as YAML or JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("arch"), dict):
        data = data["arch"]
    if not isinstance(data, dict):
        raise UserError(f"--shape {text}: expected a mapping of ModelArch fields")
    data = {k: _yaml_float(k, v) for k, v in data.items()}
    try:
        return ModelArch.from_dict(data)
    except ArchError as err:
        raise ArchError(f"--shape {text}: {err}") from None
    except TypeError as err:  # a required field missing
        raise ArchError(f"--shape {text}: {err}") from None
