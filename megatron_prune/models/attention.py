"""Core attention without [b, heads, s, s] scores: one module for every family.

megatron-core's local ``DotProductAttention`` materialises the full score matrix in the input
dtype and softmaxes it unfused; Transformer Engine's fused attention needs TE. This module takes
the same inputs (``[s, b, heads, d]`` query, ``[s, b, groups, d]`` key/value) and calls

* ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on
  CUDA, the fused flash kernel on CPU), with grouped-query attention done by the kernel
  (``enable_gqa``) instead of repeating keys and values, or
* ``torch_npu.npu_fusion_attention`` on Ascend tensors, the kernel MindSpeed uses (untested
  here: there is no NPU; ``tests/test_npu_branches.py`` checks the call against a fake).

Causal masks, Gemma 3's sliding-window layers, a custom softmax scale and dropout are covered;
QK-norm and RoPE happen before core attention, tensor / sequence parallelism outside it (each
rank sees its own heads and the full sequence here), so neither needs anything in this module.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from megatron_prune.compat import is_layer_window_attention, model_layer_number
from megatron_prune.compute import ATTENTION_BACKENDS

# npu_fusion_attention's sparse modes (torch_npu docs, "sparse_mode"): with these the kernel
# builds causal / band masks itself from a compressed 2048 x 2048 upper-triangular mask.
_NPU_LEFT_UP_CAUSAL = 2  # query i sees keys 0..i (training and prefill: as many queries as keys)
_NPU_RIGHT_DOWN_CAUSAL = 3  # aligned to the last key: a KV-cache decode step sees everything
_NPU_BAND = 4
_NPU_COMPRESSED_MASK_SIZE = 2048


class FusedCoreAttention(MegatronModule):
    """Drop-in for ``DotProductAttention`` (same constructor and forward signature) that never
    forms the score matrix. ``use_npu_kernel`` is a class attribute so the spec can pick plain
    SDPA even on an NPU (``--attention-backend sdpa``)."""

    use_npu_kernel = True

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        model_comm_pgs: Any = None,  # pg_collection's name in 0.13-0.14 (compat.py)
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("context parallelism is not supported by core attention")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"softmax_type={config.softmax_type} is not supported")
        self.attn_mask_type = attn_mask_type
        self.head_dim = config.kv_channels
        layer_number = max(1, layer_number)
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        if config.apply_query_key_layer_scaling:  # as DotProductAttention: scale / layer number
            self.softmax_scale /= layer_number
        self.window = None  # (left, right) tokens a query sees besides itself
        in_model = model_layer_number(layer_number, config)
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, in_model):
            self.window = tuple(config.window_size)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """[sq, b, np, d], [sk, b, ng, d] x2 -> [sq, b, np * d]."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias are not supported")
        sq, batch, heads, _ = query.shape
        dropout = self.dropout_p if self.training else 0.0
        if query.device.type == "npu" and self.use_npu_kernel:
            context = _npu_attention(query, key, value, self.softmax_scale, self.window, dropout)
        else:
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
            mask = None
            causal = self.attn_mask_type == AttnMaskType.causal
            if attention_mask is not None:
                mask = ~attention_mask  # Megatron: True = masked; SDPA: True = attend
            elif self.window is not None or (causal and sq != k.size(2)):
                mask = allowed_positions(sq, k.size(2), self.window, q.device)
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout,
                is_causal=causal and mask is None and sq > 1,
                scale=self.softmax_scale, enable_gqa=k.size(1) != heads,
            )  # fmt: skip
            context = context.permute(2, 0, 1, 3)
        return context.reshape(sq, batch, heads * self.head_dim)


@lru_cache(maxsize=8)
def allowed_positions(
    sq: int, sk: int, window: tuple[int, int] | None, device: torch.device
) -> torch.Tensor:
    """[sq, sk] bool, True where query i may attend key j: causal, aligned to the last key (so a
    decode step with a KV cache sees everything before it), and inside the window when one is
    set. Cached: every layer of a forward asks for the same mask."""
    offset = sk - sq
    i = torch.arange(sq, device=device).unsqueeze(1) + offset
    j = torch.arange(sk, device=device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        left, right = window
        allowed = (j >= i - left) & (j <= i + right)
    return allowed


def _npu_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
    window: tuple[int, int] | None, dropout: float,
) -> torch.Tensor:  # fmt: skip
    """torch_npu's fused attention in the BNSD layout, with the kernel's own causal (or band)
    mask; returns [sq, b, np, d]. Grouped-query keys go in with their own head count."""
    import torch_npu

    q, k, v = (t.permute(1, 2, 0, 3).contiguous() for t in (query, key, value))
    mask = _npu_compressed_mask(query.device)
    if window is None:
        same_length = query.size(0) == key.size(0)
        extra = {"sparse_mode": _NPU_LEFT_UP_CAUSAL if same_length else _NPU_RIGHT_DOWN_CAUSAL}
    else:  # band: pre_tockens keys before the query, next_tockens after it
        extra = {"sparse_mode": _NPU_BAND, "pre_tockens": window[0], "next_tockens": window[1]}
    out = torch_npu.npu_fusion_attention(
        q, k, v, q.size(1), "BNSD", atten_mask=mask, scale=scale, keep_prob=1.0 - dropout,
        **extra,
    )[0]  # fmt: skip
    return out.permute(2, 0, 1, 3)


@lru_cache(maxsize=4)
def _npu_compressed_mask(device: torch.device) -> torch.Tensor:
    size = _NPU_COMPRESSED_MASK_SIZE
    return torch.triu(torch.ones(size, size, dtype=torch.bool, device=device), diagonal=1)


class SdpaCoreAttention(FusedCoreAttention):
    """``--attention-backend sdpa``: torch's SDPA on every device, the NPU kernel never."""

    use_npu_kernel = False


def core_attention_module(backend: str) -> type[MegatronModule]:
    """The core-attention class for ``--attention-backend``: ``auto`` picks the fastest this
    machine has (torch_npu's kernel on Ascend, SDPA elsewhere); ``local`` is megatron-core's
    unfused DotProductAttention, kept for comparison and as the reference in tests."""
    if backend == "auto":
        return FusedCoreAttention
    if backend == "sdpa":
        return SdpaCoreAttention
    if backend == "local":
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        return DotProductAttention
    raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
