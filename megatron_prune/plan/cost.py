"""What a model costs, from its :class:`ModelArch` alone, and the budgets ``plan`` takes.

Counts (h = hidden size, d = head_dim, per layer f = FFN size, n = heads, g = query groups,
Vp = padded vocabulary, s = sequence length):

* **Parameters of a block**: QKV ``h*(n+2g)*d`` (+ ``(n+2g)*d`` bias), output projection
  ``n*d*h``, gated FFN ``3*h*f``, pre-norms ``2h`` (+ ``2h`` post-norms, + ``2d`` QK-norms).
  The whole model adds the embedding ``Vp*h``, the output layer ``Vp*h`` unless tied, and the
  final norm ``h``. Vp, not V: the padded rows are stored and multiplied.
* **FLOPs per token, forward**: ``2 x`` the matmul weights (every weight is one multiply-add per
  token) plus attention's ``4*s_eff*n*d`` (QK^T and AV over the whole window, the convention of
  Megatron's and Kaplan et al.'s counts, which ignore the causal mask; ``s_eff = min(s, window)``
  on sliding-window layers). The model adds the output layer's ``2*h*Vp``.
* **Latency**: an analytic proxy equal to the blocks' FLOPs (in FLOP units, so a latency budget
  is a FLOPs budget), or, with ``--latency-table FILE`` (``bench`` timings), milliseconds from
  a per-layer model fitted to the timed layers (:mod:`megatron_prune.plan.latency`).

A budget ``metric=keep`` is the fraction of the dense model's *block* cost to keep:
``params=0.5`` keeps half of the transformer blocks' parameters (embedding and output layer are
not counted: width pruning of the FFN and heads cannot change them). A plan meets it when the
pruned blocks' cost is within :data:`TOLERANCE` (relative) of ``keep`` times the dense cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_prune.errors import UserError
from megatron_prune.models.arch import LayerWidths, ModelArch

if TYPE_CHECKING:
    from megatron_prune.plan.latency import LatencyModel

METRICS = ("params", "flops", "latency")
TOLERANCE = 0.01  # |achieved / keep - 1| a plan may miss its budget by
DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class Budget:
    """Keep ``keep`` (0 < keep <= 1) of the dense blocks' ``metric``."""

    metric: str
    keep: float
    latency: LatencyModel | None = None  # latency from bench timings (None: analytic)

    def __str__(self) -> str:
        return f"{self.metric}={self.keep:g}"

    def layer_cost(self, arch: ModelArch, s: LayerShape, seq_len: int) -> float:
        """A block's cost in this budget's metric (latency: the fitted model when given)."""
        if self.metric == "latency" and self.latency is not None:
            return self.latency.layer_ms(arch, s)
        return layer_cost(arch, self.metric, s, seq_len)

    def blocks_cost(self, arch: ModelArch, shapes: Sequence[LayerShape], seq_len: int) -> float:
        return sum(self.layer_cost(arch, s, seq_len) for s in shapes)

    def met_by(self, fraction: float) -> bool:
        return abs(fraction / self.keep - 1) <= TOLERANCE


def parse_budget(text: str | Budget) -> Budget:
    """``"params=0.5"`` -> Budget("params", 0.5); refuses anything else with the syntax."""
    if isinstance(text, Budget):
        metric, value = text.metric, str(text.keep)
    else:
        metric, sep, value = str(text).partition("=")
        if not sep:
            raise UserError(f"--budget {text!r}: write METRIC=FRACTION, e.g. params=0.5 "
                            f"(metrics: {', '.join(METRICS)})")  # fmt: skip
    metric = metric.strip()
    if metric not in METRICS:
        raise UserError(f"--budget {text}: unknown metric {metric!r}; use one of {METRICS}")
    try:
        keep = float(value)
    except ValueError:
        raise UserError(f"--budget {text}: {value!r} is not a number") from None
    if not 0 < keep <= 1:
        raise UserError(f"--budget {text}: the fraction to keep must be in (0, 1], got {keep}")
    return Budget(metric, keep)


@dataclass(frozen=True)
class LayerShape:
    """One block as the cost model sees it: its widths, the hidden size, whether it is local."""

    hidden: float
    ffn: float
    heads: float
    groups: float
    local: bool = False


def layer_shapes(arch: ModelArch, layers: Sequence[int] | None = None) -> list[LayerShape]:
    """The blocks of ``arch`` (or its source layers ``layers``) as cost-model shapes."""
    layers = range(arch.num_layers) if layers is None else layers
    out = []
    for i in layers:
        w: LayerWidths = arch.widths(i)
        out.append(LayerShape(arch.hidden_size, w.ffn_hidden_size, w.num_attention_heads,
                              w.num_query_groups, arch.is_local_layer(i)))  # fmt: skip
    return out


def matmul_params(arch: ModelArch, s: LayerShape) -> float:
    """Weights of a block's matrices (what the 2 x params FLOPs term multiplies)."""
    d = arch.head_dim
    return s.hidden * (s.heads + 2 * s.groups) * d + s.heads * d * s.hidden + 3 * s.hidden * s.ffn


def layer_params(arch: ModelArch, s: LayerShape) -> float:
    """Every parameter of a block: matrices, QKV bias, norms."""
    d = arch.head_dim
    extra = 2 * s.hidden * (2 if arch.post_norms else 1) + (2 * d if arch.qk_norm else 0)
    if arch.qkv_bias:
        extra += (s.heads + 2 * s.groups) * d
    return matmul_params(arch, s) + extra


def attention_span(arch: ModelArch, s: LayerShape, seq_len: int) -> float:
    """``s_eff * n * d``: the keys each query meets (window-limited on sliding-window layers)
    times the block's query width, what QK^T and AV cost per token up to a constant."""
    window = seq_len
    if s.local and arch.sliding_window is not None:
        window = min(seq_len, arch.sliding_window)
    return window * s.heads * arch.head_dim


def layer_flops(arch: ModelArch, s: LayerShape, seq_len: int) -> float:
    """Forward FLOPs per token of a block at sequence length ``seq_len``."""
    return 2 * matmul_params(arch, s) + 4 * attention_span(arch, s, seq_len)


def layer_cost(arch: ModelArch, metric: str, s: LayerShape, seq_len: int) -> float:
    """A block's cost in ``metric`` (latency: the analytic proxy, its FLOPs)."""
    return layer_params(arch, s) if metric == "params" else layer_flops(arch, s, seq_len)


def blocks_cost(arch: ModelArch, metric: str, shapes: Sequence[LayerShape], seq_len: int) -> float:
    return sum(layer_cost(arch, metric, s, seq_len) for s in shapes)


def block_params(arch: ModelArch) -> int:
    """Parameters of the transformer blocks of ``arch`` (per-layer widths included)."""
    return int(blocks_cost(arch, "params", layer_shapes(arch), 0))


def block_flops(arch: ModelArch, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """Forward FLOPs per token of the transformer blocks of ``arch``."""
    return int(blocks_cost(arch, "flops", layer_shapes(arch), seq_len))


def latency_proxy(arch: ModelArch, seq_len: int = DEFAULT_SEQ_LEN) -> float:
    """Analytic latency proxy of the blocks: proportional to their FLOPs (no device timings;
    ``--latency-table`` calibration from ``bench`` is planned)."""
    return float(block_flops(arch, seq_len))


def model_params(arch: ModelArch) -> int:
    """Every stored parameter: blocks, embedding, output layer (unless tied), final norm."""
    vocab = arch.padded_vocab_size * arch.hidden_size
    return block_params(arch) + vocab * (1 if arch.tie_embeddings else 2) + arch.hidden_size


def model_flops(arch: ModelArch, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """Forward FLOPs per token of the whole model: blocks plus the output layer."""
    return block_flops(arch, seq_len) + 2 * arch.hidden_size * arch.padded_vocab_size


def block_cost(arch: ModelArch, metric: str, seq_len: int = DEFAULT_SEQ_LEN) -> float:
    """The dense cost a budget is a fraction of."""
    return blocks_cost(arch, metric, layer_shapes(arch), seq_len)
