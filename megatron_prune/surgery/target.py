"""The target architecture (``--target TARGET.yaml``) and its validation against the source and
the output layout, before any tensor is touched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_prune.models.arch import ArchError, ModelArch

KEYS = ("hidden_size", "num_layers", "drop_layers", "ffn_hidden_size", "num_attention_heads",
        "num_query_groups")  # fmt: skip


class TargetError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    hidden_size: int
    num_layers: int
    drop_layers: tuple[int, ...] | None  # 0-based source layers; None: lowest Block Influence
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int

    def arch(self, source: ModelArch, post_norms: bool | None = None) -> ModelArch:
        """The pruned model's architecture."""
        data = source.to_dict()
        data.update(
            hidden_size=self.hidden_size, num_layers=self.num_layers,
            ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
        )  # fmt: skip
        if post_norms is not None:
            data["post_norms"] = post_norms
        return ModelArch.from_dict(data)


def _nearby(value: int, ok) -> str:
    below = next((v for v in range(value, 0, -1) if ok(v)), None)
    above = next((v for v in range(value + 1, 4 * value + 2) if ok(v)), None)
    return ", ".join(str(v) for v in (below, above) if v is not None)


def load_target(path: str | Path | dict, source: ModelArch, tp: int = 1, pp: int = 1) -> Target:
    """Read and validate a target; every problem is reported at once, with nearby valid values."""
    data = yaml.safe_load(Path(path).read_text()) if not isinstance(path, dict) else path
    data = data or {}
    unknown = set(data) - set(KEYS)
    if unknown:
        raise TargetError(f"unknown target keys {sorted(unknown)}; known: {list(KEYS)}")
    lists = [k for k, v in data.items() if isinstance(v, list) and k != "drop_layers"]
    if lists:
        raise TargetError(
            f"per-layer values for {lists} (heterogeneous models) are not supported yet; "
            "give one value per key"
        )
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
    t = Target(
        hidden_size=data.get("hidden_size", source.hidden_size),
        num_layers=layers,
        drop_layers=drop,
        ffn_hidden_size=data.get("ffn_hidden_size", source.ffn_hidden_size),
        num_attention_heads=data.get("num_attention_heads", source.num_attention_heads),
        num_query_groups=data.get("num_query_groups", source.num_query_groups),
    )
    for key in ("hidden_size", "num_layers", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups"):  # fmt: skip
        value, limit = getattr(t, key), getattr(source, key)
        if not 1 <= value <= limit:
            problems.append(f"{key}={value} must be between 1 and the source's {limit}")
    g, n = t.num_query_groups, t.num_attention_heads
    if n % g:
        problems.append(
            f"num_attention_heads={n} is not a multiple of num_query_groups={g} "
            f"(try {_nearby(n, lambda v: v % g == 0)})"
        )
    elif n // g > source.num_attention_heads // source.num_query_groups:
        problems.append(
            f"{n // g} heads per group exceeds the source's "
            f"{source.num_attention_heads // source.num_query_groups}"
        )
    for key in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        value = getattr(t, key)
        if value % tp:
            problems.append(
                f"{key}={value} is not divisible by TP={tp} "
                f"(try {_nearby(value, lambda v: v % tp == 0)})"
            )
    if not problems:
        try:
            t.arch(source).check_layout(tp, pp)
        except ArchError as err:
            problems.append(str(err))
    if problems:
        raise TargetError("invalid target: " + "; ".join(problems))
    return t
