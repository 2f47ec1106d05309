"""A plain-PyTorch reference of the Pangu Light sandwich-norm decoder (Sec. 3.3), written from
the paper and independent of megatron-core, with Hugging Face-style parameter names:

    h = x + N_post_attn(Attn(N_in(x)));   out = h + N_post_ffn(FFN(N_pre_ffn(h)))

Attention is causal GQA with rotate-half RoPE; FFN is SwiGLU; all norms are RMSNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_prune.models.arch import ModelArch


class Norm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [b, heads, s, d] -> rotated, rotate-half convention."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.a = a
        n, g, d, h = a.num_attention_heads, a.num_query_groups, a.head_dim, a.hidden_size
        self.q_proj = nn.Linear(h, n * d, bias=False)
        self.k_proj = nn.Linear(h, g * d, bias=False)
        self.v_proj = nn.Linear(h, g * d, bias=False)
        self.o_proj = nn.Linear(n * d, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a
        b, s, _ = x.shape
        n, g, d = a.num_attention_heads, a.num_query_groups, a.head_dim
        q = self.q_proj(x).view(b, s, n, d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, g, d).transpose(1, 2).repeat_interleave(n // g, dim=1)
        v = self.v_proj(x).view(b, s, g, d).transpose(1, 2).repeat_interleave(n // g, dim=1)
        q, k = rope(q, a.rope_theta), rope(k, a.rope_theta)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, n * d))


class MLP(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(a.ffn_hidden_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SandwichLayer(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        e = a.norm_eps
        self.input_layernorm = Norm(a.hidden_size, e)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = Norm(a.hidden_size, e)
        self.pre_feedforward_layernorm = Norm(a.hidden_size, e)
        self.mlp = MLP(a)
        self.post_feedforward_layernorm = Norm(a.hidden_size, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Body(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(SandwichLayer(a) for _ in range(a.num_layers))
        self.norm = Norm(a.hidden_size, a.norm_eps)


class SandwichLM(nn.Module):
    def __init__(self, a: ModelArch) -> None:
        super().__init__()
        self.model = Body(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))
