"""Weight maps between Hugging Face tensor names and Megatron-Core's, written once per family as a
table of rules; the inverse direction is derived from the same rules.

Megatron names are those of an unsharded (TP=1, PP=1) GPTModel's ``state_dict()``, with global
layer indices; :mod:`megatron_prune.checkpoint.sharding` takes them to and from shards.
Every rule covers one Megatron tensor; ``{i}`` in a name stands for the layer index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from megatron_prune.errors import CheckpointError
from megatron_prune.models.arch import ModelArch

Tensors = Mapping[str, torch.Tensor]


class WeightMapError(CheckpointError):
    """A tensor is missing or left over: the checkpoint does not match the architecture."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


@dataclass(frozen=True)
class Copy:
    """One HF tensor is one Megatron tensor. ``vocab`` rows are padded to the padded vocabulary
    on the way in and cut back on the way out (embedding, output layer)."""

    megatron: str
    hf: str
    vocab: bool = False

    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,)

    def to_megatron(self, get: Callable[[str], torch.Tensor], arch: ModelArch) -> torch.Tensor:
        t = get(self.hf)
        if self.vocab and t.shape[0] != arch.padded_vocab_size:
            pad = t.new_zeros(arch.padded_vocab_size - t.shape[0], *t.shape[1:])
            t = torch.cat([t, pad])
        return t

    def to_hf(self, t: torch.Tensor, arch: ModelArch) -> dict[str, torch.Tensor]:
        return {self.hf: t[: arch.vocab_size] if self.vocab else t}


@dataclass(frozen=True)
class FuseQKV:
    """Megatron keeps Q, K and V in one matrix, grouped by query group.

    With n heads, g groups, p = n/g heads per group and head size d, rows are laid out as
    [q_0 .. q_{p-1}, k, v] for group 0, then group 1, ... Example, n=4, g=2, d=1:
    HF q rows (q0, q1, q2, q3), k rows (k0, k1), v rows (v0, v1) -> Megatron rows
    (q0, q1, k0, v0, q2, q3, k1, v1). Biases follow the same layout. ``layer`` (filled in when
    the rule is expanded) picks that layer's n and g in heterogeneous models.
    """

    megatron: str
    q: str
    k: str
    v: str
    layer: int = 0

    def hf_names(self) -> tuple[str, ...]:
        return (self.q, self.k, self.v)

    def to_megatron(self, get: Callable[[str], torch.Tensor], arch: ModelArch) -> torch.Tensor:
        widths, d = arch.widths(self.layer), arch.head_dim
        g = widths.num_query_groups
        p = widths.num_attention_heads // g
        q, k, v = get(self.q), get(self.k), get(self.v)
        tail = q.shape[1:]
        grouped = torch.cat(
            [q.reshape(g, p * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], dim=1
        )  # [g, (p + 2) d, ...]
        return grouped.reshape(g * (p + 2) * d, *tail)

    def to_hf(self, t: torch.Tensor, arch: ModelArch) -> dict[str, torch.Tensor]:
        g, d = arch.widths(self.layer).num_query_groups, arch.head_dim
        p = t.shape[0] // (g * d) - 2  # heads per group, read off the tensor (pruned models)
        grouped = t.reshape(g, (p + 2) * d, *t.shape[1:])
        q, k, v = grouped.split([p * d, d, d], dim=1)
        flat = (-1, *t.shape[1:])
        return {
            self.q: q.reshape(flat).contiguous(),
            self.k: k.reshape(flat).contiguous(),
            self.v: v.reshape(flat).contiguous(),
        }


@dataclass(frozen=True)
class FuseGateUp:
    """Megatron's gated FC1 is [W_gate; W_up] stacked on the output (row) axis."""

    megatron: str
    gate: str
    up: str

    def hf_names(self) -> tuple[str, ...]:
        return (self.gate, self.up)

    def to_megatron(self, get: Callable[[str], torch.Tensor], arch: ModelArch) -> torch.Tensor:
        return torch.cat([get(self.gate), get(self.up)])

    def to_hf(self, t: torch.Tensor, arch: ModelArch) -> dict[str, torch.Tensor]:
        gate, up = t.chunk(2)
        return {self.gate: gate.contiguous(), self.up: up.contiguous()}


Rule = Copy | FuseQKV | FuseGateUp


def _expand(rule: Rule, layer: int) -> Rule:
    fields = {
        k: v.replace("{i}", str(layer)) if isinstance(v, str) else v
        for k, v in rule.__dict__.items()
    }
    if "layer" in fields:
        fields["layer"] = layer
    return type(rule)(**fields)


def expand_rules(
    layer_rules: Iterable[Rule], other_rules: Iterable[Rule], num_layers: int
) -> list[Rule]:
    """Concrete rules for a model of ``num_layers`` layers."""
    rules = list(other_rules)
    for i in range(num_layers):
        rules.extend(_expand(r, i) for r in layer_rules)
    return rules


def hf_to_megatron(hf: Tensors, rules: list[Rule], arch: ModelArch) -> dict[str, torch.Tensor]:
    """Apply ``rules`` to HF tensors. Every HF tensor must be used exactly once."""
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise WeightMapError(f"tensor {name!r} missing from the source checkpoint")
        used.add(name)
        return hf[name]

    out = {r.megatron: r.to_megatron(get, arch) for r in rules}
    unused = sorted(set(hf) - used)
    if unused:
        raise WeightMapError(
            f"{len(unused)} source tensors have no rule (e.g. {unused[:3]}): "
            "the checkpoint does not match its family"
        )
    return out


def megatron_to_hf(state: Tensors, rules: list[Rule], arch: ModelArch) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_megatron`."""
    missing = [r.megatron for r in rules if r.megatron not in state]
    if missing:
        raise WeightMapError(f"Megatron tensors missing: {missing[:3]}")
    unused = sorted(set(state) - {r.megatron for r in rules})
    if unused:
        raise WeightMapError(f"Megatron tensors with no rule: {unused[:3]}")
    out: dict[str, torch.Tensor] = {}
    for r in rules:
        out.update(r.to_hf(state[r.megatron], arch))
    return out
