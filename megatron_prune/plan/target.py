"""The target architecture (``--target TARGET.yaml``) and its validation against the source and
the output layout, before any tensor is touched.

``ffn_hidden_size``, ``num_attention_heads`` and ``num_query_groups`` take one value or a list
with one value per kept layer (a heterogeneous model); an omitted key keeps each kept layer's
source value.

A target written by ``megatron-prune plan`` also carries a ``plan:`` mapping (how it was made:
strategy, budget, achieved cost, source, scores, layout); :func:`load_target` skips that record,
so ``prune --target PLAN.yaml`` takes a plan as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_prune.errors import TargetError
from megatron_prune.inputs import check_keys, read_yaml
from megatron_prune.models.arch import PER_LAYER, ArchError, ModelArch

KEYS = ("hidden_size", "num_layers", "drop_layers", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups")  # fmt: skip

Width = int | tuple[int, ...] | None  # one value, one per kept layer, or None: the source's
PLAN_KEY = "plan"  # the provenance record of a plan file; not part of the target


@dataclass(frozen=True)
class Target:
    hidden_size: int
    num_layers: int
    drop_layers: tuple[int, ...] | None  # 0-based source layers; None: lowest Block Influence
    ffn_hidden_size: Width = None
    num_attention_heads: Width = None
    num_query_groups: Width = None

    def kept_layers(self, source: ModelArch) -> list[int] | None:
        """The source layers that survive, when the target alone decides them (None: Block
        Influence does)."""
        if self.drop_layers is not None:
            return [i for i in range(source.num_layers) if i not in self.drop_layers]
        if self.num_layers == source.num_layers:
            return list(range(source.num_layers))
        return None

    def layer_values(self, name: str, source: ModelArch, kept: Sequence[int]) -> tuple[int, ...]:
        """Per-layer width ``name`` of each kept layer (``kept``: their source indices)."""
        value = getattr(self, name)
        if value is None:
            return tuple(getattr(source.widths(i), name) for i in kept)
        if isinstance(value, int):
            return (value,) * len(kept)
        return value

    def changes(self, name: str, source: ModelArch) -> bool:
        """Whether per-layer width ``name`` differs from the source in some kept layer."""
        value = getattr(self, name)
        if value is None:
            return False
        kept = self.kept_layers(source)
        if kept is None:  # scores pick the layers later: compare with every source layer
            given = value if isinstance(value, tuple) else (value,)
            return source.heterogeneous or any(v != getattr(source, name) for v in given)
        values = self.layer_values(name, source, kept)
        return any(v != getattr(source.widths(i), name) for v, i in zip(values, kept, strict=True))

    def arch(
        self, source: ModelArch, kept: Sequence[int], post_norms: bool | None = None
    ) -> ModelArch:
        """The pruned model's architecture, ``kept`` being the surviving source layers."""
        data = source.to_dict()
        data.update(hidden_size=self.hidden_size, num_layers=len(kept))
        for name in PER_LAYER:
            data[f"layer_{name}"] = self.layer_values(name, source, kept)
        if post_norms is not None:
            data["post_norms"] = post_norms
        return ModelArch.from_dict(data)


def _nearby(value: int, ok: Callable[[int], bool]) -> str:
    below = next((v for v in range(value, 0, -1) if ok(v)), None)
    above = next((v for v in range(value + 1, 4 * value + 2) if ok(v)), None)
    return ", ".join(str(v) for v in (below, above) if v is not None)


def _grouped(values: Sequence) -> list[tuple[object, str]]:
    """Each distinct value with where it occurs: "" when every kept layer has it, else
    " (kept layers [..])", so uniform targets get the short message."""
    where: dict[object, list[int]] = {}
    for k, v in enumerate(values):
        where.setdefault(v, []).append(k)
    every = len(values)
    return [(v, "" if len(ks) == every else f" (kept layers {ks})") for v, ks in where.items()]


def _parse_width(key: str, value: object, layers: int, problems: list[str]) -> Width:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != layers or not all(isinstance(v, int) for v in value):
            problems.append(
                f"{key}: give one value, or a list of {layers} integers (one per kept layer); "
                f"got {list(value)}"
            )
            return None
        return tuple(value)
    if not isinstance(value, int):
        problems.append(f"{key}: expected an integer or a list, got {value!r}")
        return None
    return value


def load_target(path: str | Path | dict, source: ModelArch, tp: int = 1, pp: int = 1) -> Target:
    """Read and validate a target; every problem is reported at once, with nearby valid values."""
    data = read_yaml(path, "--target") if not isinstance(path, dict) else path
    data = data or {}
    if not isinstance(data, dict):
        raise TargetError(f"a target is a mapping of {list(KEYS)}, got {type(data).__name__}")
    if not isinstance(data.get(PLAN_KEY, {}), dict):
        raise TargetError(f"{PLAN_KEY}: expected the mapping `megatron-prune plan` writes")
    data = {k: v for k, v in data.items() if k != PLAN_KEY}
    check_keys(data, KEYS, "the target" if isinstance(path, dict) else f"target {path}",
               TargetError)  # fmt: skip
    problems: list[str] = []
    drop = data.get("drop_layers")
    if drop is not None:
        drop = tuple(sorted(set(int(i) for i in drop)))
        bad = [i for i in drop if not 0 <= i < source.num_layers]
        if bad:
            problems.append(f"drop_layers {bad} outside 0..{source.num_layers - 1}")
    layers = data.get("num_layers", source.num_layers - len(drop or ()))
    if drop is not None and layers != source.num_layers - len(drop):
        problems.append(
            f"num_layers={layers} disagrees with dropping {len(drop)} of {source.num_layers}"
        )
    for key in ("hidden_size", "num_layers"):
        value, limit = data.get(key, getattr(source, key)), getattr(source, key)
        if not isinstance(value, int) or not 1 <= value <= limit:
            problems.append(f"{key}={value} must be between 1 and the source's {limit}")
    if problems:  # the per-layer checks below need a valid layer count
        raise TargetError("invalid target: " + "; ".join(problems))
    t = Target(
        hidden_size=data.get("hidden_size", source.hidden_size),
        num_layers=layers,
        drop_layers=drop,
        **{k: _parse_width(k, data.get(k), layers, problems) for k in PER_LAYER},
    )
    # Kept layers are known unless Block Influence picks them; then every source layer has the
    # same widths (scores exist only for uniform models), so the first ones stand in.
    kept = t.kept_layers(source) or list(range(layers))
    values = {k: t.layer_values(k, source, kept) for k in PER_LAYER}
    for key in PER_LAYER:
        for value, where in _grouped(values[key]):
            if not 1 <= value <= getattr(source, key):
                problems.append(
                    f"{key}={value}{where} must be between 1 and the source's "
                    f"{getattr(source, key)}"
                )
    source_p = max(w.num_attention_heads // w.num_query_groups for w in source.all_widths())
    pairs = list(zip(values["num_attention_heads"], values["num_query_groups"], strict=True))
    for (n, g), where in _grouped(pairs):
        if g < 1:
            continue
        if n % g:
            problems.append(
                f"num_attention_heads={n} is not a multiple of num_query_groups={g}{where} "
                f"(try {_nearby(n, lambda v, g=g: v % g == 0)})"
            )
        elif n // g > source_p:
            problems.append(f"{n // g} heads per group{where} exceeds the source's {source_p}")
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        for value, where in _grouped(values[key]):
            if value % tp:
                problems.append(
                    f"{key}={value}{where} is not divisible by TP={tp} "
                    f"(try {_nearby(value, lambda v: v % tp == 0)})"
                )
    if not problems:
        try:
            t.arch(source, kept).check_layout(tp, pp)
        except ArchError as err:
            problems.append(str(err))
    if problems:
        raise TargetError("invalid target: " + "; ".join(problems))
    return t
