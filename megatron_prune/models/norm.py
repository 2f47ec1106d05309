"""RMSNorm for Megatron layer specs, in fp32, with Gemma's zero-centred gamma and sequence
parallelism.

megatron-core's local norm (``WrappedTorchNorm``) refuses both zero-centred gamma and sequence
parallelism, and Transformer Engine is unavailable on CPU and NPU, so the families share this one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * gamma, computed in fp32.

    gamma is ``weight`` or, with ``config.layernorm_zero_centered_gamma``, ``1 + weight`` (the
    Hugging Face Gemma convention, kept so conversions never add and subtract 1 and stay exact).
    Norms over the hidden size mark their weight ``sequence_parallel`` so Megatron all-reduces
    its gradient over the TP group when activations are split along the sequence.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        over_hidden: bool = True,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        initial = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(initial(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = over_hidden and config.sequence_parallel

    def gamma(self) -> torch.Tensor:
        """The effective per-channel scale, in fp32."""
        w = self.weight.float()
        return w + 1.0 if self.zero_centered_gamma else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's own rms_norm: one fused kernel on CUDA instead of five elementwise ones
        normed = F.rms_norm(x.float(), (x.size(-1),), self.gamma(), self.eps)
        return normed.to(x.dtype)


class QKNorm(RMSNorm):
    """RMSNorm over one head's channels (QK-norm). Its weight is replicated across TP but sees
    only the local heads, so it is not a sequence-parallel hidden-size norm."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(config, hidden_size, eps, over_hidden=False)
