"""One family-agnostic record of a decoder-only transformer's shape and numerics.

Everything a Megatron model, a Hugging Face config and a pruning plan need to agree on lives in
:class:`ModelArch`; it is what checkpoint metadata stores, so later commands need no model flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ACTIVATIONS = ("silu", "gelu_tanh")


class ArchError(ValueError):
    """An architecture or layout that cannot be built; the message says how to fix it."""


@dataclass(frozen=True)
class ModelArch:
    """Shape and numerics of a pre-norm (optionally sandwich-norm) GQA decoder.

    Notation used across the package: h = hidden_size, f = ffn_hidden_size, n = attention heads,
    g = query groups (KV heads), d = head_dim, V = vocab_size, Vp = padded vocab.
    """

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    activation: str = "silu"  # gated: act(x W_gate) * (x W_up)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False  # sandwich block: RMSNorm after attention and after the MLP
    zero_centered_gamma: bool = False  # norm computes x_hat * (1 + w) (Gemma)
    embedding_scale: float = 1.0  # token embeddings multiplied by this (Gemma: sqrt(h))
    softmax_scale: float | None = None  # None: 1/sqrt(d)
    sliding_window: int | None = None  # tokens a local layer sees, itself included
    global_every: int | None = None  # with sliding_window: every k-th layer is global (1-based)
    # with sliding_window: which layers are local, one flag per layer; overrides global_every
    # (depth pruning keeps each surviving layer's own kind)
    local_layers: tuple[bool, ...] | None = None
    local_rope_theta: float | None = None  # RoPE base of local layers, if it differs
    needs_bos: bool = False  # every evaluation window starts with BOS
    max_position_embeddings: int = 4096
    vocab_pad_multiple: int = 128

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ArchError(f"activation {self.activation!r} unknown; use one of {ACTIVATIONS}")
        if self.local_layers is not None:
            object.__setattr__(self, "local_layers", tuple(bool(x) for x in self.local_layers))
            if len(self.local_layers) != self.num_layers:
                raise ArchError(
                    f"local_layers has {len(self.local_layers)} flags for {self.num_layers} layers"
                )
        if self.num_attention_heads % self.num_query_groups:
            raise ArchError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )

    @property
    def padded_vocab_size(self) -> int:
        """V rounded up to ``vocab_pad_multiple``. Independent of TP, so a checkpoint's tensors
        have the same shapes at every layout (any TP dividing the multiple works)."""
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    def is_local_layer(self, layer: int) -> bool:
        """Whether 0-based ``layer`` uses the sliding window (and the local RoPE base)."""
        if self.sliding_window is None:
            return False
        if self.local_layers is not None:
            return self.local_layers[layer]
        return self.global_every is None or (layer + 1) % self.global_every != 0

    def check_layout(self, tp: int, pp: int, vpp: int | None = None) -> None:
        """Raise :class:`ArchError` naming the fix if this model cannot run at tp x pp."""
        problems = []
        for name, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_query_groups", self.num_query_groups),
            ("ffn_hidden_size", self.ffn_hidden_size),
            ("padded vocab size", self.padded_vocab_size),
        ):
            if value % tp:
                ok = [t for t in range(1, value + 1) if value % t == 0 and t <= 64]
                problems.append(f"TP={tp} does not divide {name}={value} (valid TP: {ok})")
        stages = pp * (vpp or 1)
        if stages > self.num_layers:
            problems.append(
                f"PP={pp}{f' x VPP={vpp}' if vpp else ''} needs at least {stages} layers, "
                f"the model has {self.num_layers}"
            )
        elif self.num_layers % stages:
            ok = [p for p in range(1, self.num_layers + 1) if self.num_layers % p == 0]
            problems.append(
                f"PP={pp}{f' x VPP={vpp}' if vpp else ''} does not divide num_layers="
                f"{self.num_layers} (valid pipeline stage counts: {ok})"
            )
        if problems:
            raise ArchError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArch:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ArchError(f"unknown architecture keys {sorted(unknown)}")
        return cls(**data)
