"""One family-agnostic record of a decoder-only transformer's shape and numerics.

Everything a Megatron model, a Hugging Face config and a pruning plan need to agree on lives in
:class:`ModelArch`; it is what checkpoint metadata stores, so later commands need no model flags.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

from megatron_prune.errors import ArchError

ACTIVATIONS = ("silu", "gelu_tanh")
# the widths that may differ per layer (heterogeneous models); ``layer_<name>`` holds the list
PER_LAYER = ("ffn_hidden_size", "num_attention_heads", "num_query_groups")


class LayerWidths(NamedTuple):
    """One layer's FFN size, head count and query-group count."""

    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int


def valid_divisors(value: int, limit: int = 64) -> list[int]:
    """The TP sizes (up to ``limit``) that divide ``value``, for error messages."""
    return [t for t in range(1, min(value, limit) + 1) if value % t == 0]


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
    # Heterogeneous models (per-layer pruning targets): one value per layer, None when every
    # layer has the scalar value above. When set, the scalar holds the widest layer's value (what
    # sizes anything shared across layers); a list of equal values collapses to the scalar, so a
    # uniform model has one representation (stacked Megatron checkpoint keys, plain HF classes).
    layer_ffn_hidden_size: tuple[int, ...] | None = None
    layer_num_attention_heads: tuple[int, ...] | None = None
    layer_num_query_groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ArchError(f"activation {self.activation!r} unknown; use one of {ACTIVATIONS}")
        if self.local_layers is not None:
            object.__setattr__(self, "local_layers", tuple(bool(x) for x in self.local_layers))
            if len(self.local_layers) != self.num_layers:
                raise ArchError(
                    f"local_layers has {len(self.local_layers)} flags for {self.num_layers} layers"
                )
        for name in PER_LAYER:
            values = getattr(self, f"layer_{name}")
            if values is None:
                continue
            values = tuple(int(v) for v in values)
            if len(values) != self.num_layers:
                raise ArchError(
                    f"layer_{name} has {len(values)} values for {self.num_layers} layers"
                )
            if min(values) < 1:
                raise ArchError(f"layer_{name} {list(values)}: every value must be >= 1")
            object.__setattr__(self, name, max(values))
            object.__setattr__(self, f"layer_{name}", None if len(set(values)) == 1 else values)
        bad = sorted(
            {(w.num_attention_heads, w.num_query_groups) for w in self.all_widths()
             if w.num_attention_heads % w.num_query_groups}
        )  # fmt: skip
        if bad:
            raise ArchError(
                "; ".join(f"num_attention_heads={n} is not a multiple of num_query_groups={g}"
                          for n, g in bad)
            )  # fmt: skip

    @property
    def heterogeneous(self) -> bool:
        """Whether any width differs between layers."""
        return any(getattr(self, f"layer_{name}") is not None for name in PER_LAYER)

    def widths(self, layer: int) -> LayerWidths:
        """FFN size, heads and query groups of 0-based ``layer``."""
        values = []
        for name in PER_LAYER:
            per_layer = getattr(self, f"layer_{name}")
            values.append(getattr(self, name) if per_layer is None else per_layer[layer])
        return LayerWidths(*values)

    def all_widths(self) -> list[LayerWidths]:
        return [self.widths(i) for i in range(self.num_layers)]

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
        checks = [(name, self.layers_with(name)) for name in
                  ("num_attention_heads", "num_query_groups", "ffn_hidden_size")]  # fmt: skip
        checks.append(("padded vocab size", {self.padded_vocab_size: None}))
        for name, by_value in checks:
            for value, layers in by_value.items():
                if value % tp:
                    where = "" if layers is None else f" in layers {layers}"
                    problems.append(
                        f"TP={tp} does not divide {name}={value}{where} "
                        f"(valid TP: {valid_divisors(value)})"
                    )
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

    def layers_with(self, name: str) -> dict[int, list[int] | None]:
        """Each distinct value of per-layer width ``name`` -> the 0-based layers that have it
        (None for a uniform model: every layer). For error messages that name layers."""
        per_layer = getattr(self, f"layer_{name}")
        if per_layer is None:
            return {getattr(self, name): None}
        out: dict[int, list[int]] = {}
        for i, v in enumerate(per_layer):
            out.setdefault(v, []).append(i)
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArch:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ArchError(f"unknown architecture keys {sorted(unknown)}")
        return cls(**data)
