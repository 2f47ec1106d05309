"""The two modules the families add to megatron-core's local layer spec.

* :class:`PostNormRowParallelLinear`: a row-parallel output projection followed by an RMSNorm,
  i.e. the post-attention / post-MLP norm of a sandwich block (Gemma 3, Pangu). Megatron's
  TransformerLayer has no slot for a post-norm, and putting the norm inside the projection keeps
  the layer class stock. Absorbing the norm (Pangu Light Eq. 8-10) swaps this module for a plain
  RowParallelLinear with scaled weights.
* :class:`LocalRopeSelfAttention`: self-attention whose sliding-window layers use their own RoPE
  base (Gemma 3: 10k local, 1M global); Megatron computes one RoPE table per model.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.attention import SelfAttention

from megatron_prune.compat import is_layer_window_attention, model_layer_number
from megatron_prune.models.norm import RMSNorm


class PostNormRowParallelLinear(RowParallelLinear):
    """out = RMSNorm(x W^T + b). Under sequence parallelism the row-parallel output is already
    split along the sequence, and the norm is per token, so nothing else changes."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.post_norm = RMSNorm(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, input_: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out, bias = super().forward(input_)
        if bias is not None:
            out = out + bias
        return self.post_norm(out), None


class LocalRopeSelfAttention(SelfAttention):
    """SelfAttention that, on sliding-window layers, replaces the model-wide RoPE table by one
    built with ``local_rope_theta``."""

    def __init__(self, *args: Any, local_rope_theta: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.local_rotary = None
        local = is_layer_window_attention(
            self.config.window_size,
            self.config.window_attn_skip_freq,
            model_layer_number(self.layer_number, self.config),
        )
        if local and local_rope_theta is not None:
            self.local_rotary = RotaryEmbedding(
                kv_channels=self.config.kv_channels,
                rotary_percent=1.0,
                rotary_base=local_rope_theta,
                use_cpu_initialization=self.config.use_cpu_initialization,
            )

    def forward(self, *args: Any, rotary_pos_emb: Any = None, **kwargs: Any) -> Any:
        if self.local_rotary is not None and rotary_pos_emb is not None:
            # rotary_pos_emb: [s, 1, 1, d]; s is the full (unsplit) sequence length
            rotary_pos_emb = self.local_rotary(rotary_pos_emb.size(0))
        return super().forward(*args, rotary_pos_emb=rotary_pos_emb, **kwargs)
