"""Latency budgets calibrated on the device: a per-layer cost fitted to ``bench`` timings.

``bench --out FILE.jsonl`` times every transformer layer's forward and groups the layers by
shape (its ``layers`` table). ``plan --budget latency=F --latency-table FILE.jsonl`` fits, to
every timed layer shape of every record in the file, the richest of these models whose
coefficients come out non-negative and that the number of distinct shapes can determine:

* ``ms = a + b * matmul + c * attention`` (3+ shapes; ``matmul`` = the block's matrix weights,
  the GEMM work per token; ``attention`` = ``s_eff * n * d``, the score and value products);
* ``ms = a + b * flops`` (2+ shapes; ``flops`` the analytic FLOPs per token of the block);
* ``ms = b * flops`` (any table: the analytic proxy, scaled to milliseconds).

The constant ``a`` is what a width cut cannot remove (kernel launches, norms, RoPE, the
attention softmax's memory traffic), which is why a measured table plans deeper cuts than FLOPs
alone for the same latency. Widths a table never saw are extrapolated by the model: time the
dense model and a pruned or ``--shape`` model or two (``bench dense pruned --out t.jsonl``) so
the fit spans the plan's range; the plan file records the fit and its worst relative error on
the timed shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_prune.bench.report import SCHEMA
from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch

FORMS = ("constant+matmul+attention", "constant+flops", "flops")


@dataclass(frozen=True)
class LatencyModel:
    """Forward milliseconds of one block, from its shape, as fitted to a bench table."""

    form: str
    coefficients: tuple[float, ...]
    seq_len: int  # the timed rows' tokens (attention's s in the fit and in the plan)
    micro_batch_size: int
    source: str
    devices: tuple[str, ...]
    shapes: int
    max_rel_error: float

    def layer_ms(self, arch: ModelArch, shape: Any) -> float:
        return float(np.dot(self.coefficients, _features(self.form, arch, shape, self.seq_len)))

    def record(self) -> dict[str, Any]:
        names = self.form.split("+")
        return {"latency_table": self.source, "form": f"ms = {' + '.join(names)}",
                "coefficients": dict(zip(names, self.coefficients, strict=True)),
                "seq_len": self.seq_len, "micro_batch_size": self.micro_batch_size,
                "devices": list(self.devices), "timed_shapes": self.shapes,
                "max_rel_error": round(self.max_rel_error, 4)}  # fmt: skip


def _features(form: str, arch: ModelArch, s: Any, seq_len: int) -> list[float]:
    from megatron_prune.plan.cost import attention_span, layer_flops, matmul_params

    values = {"constant": 1.0, "matmul": matmul_params(arch, s),
              "attention": attention_span(arch, s, seq_len),
              "flops": layer_flops(arch, s, seq_len)}  # fmt: skip
    return [float(values[name]) for name in form.split("+")]


def _timed_rows(records: list[dict], path: Path) -> list[tuple[ModelArch, Any, float]]:
    from megatron_prune.plan.cost import LayerShape

    rows = []
    for record in records:
        arch = ModelArch.from_dict(record["arch"])
        for row in record.get("layers") or []:
            shape = LayerShape(row["hidden_size"], row["ffn_hidden_size"],
                               row["num_attention_heads"], row["num_query_groups"],
                               bool(row["local"]))  # fmt: skip
            rows.append((arch, shape, float(row["forward_ms"])))
    if not rows:
        raise UserError(f"--latency-table {path} has no layer timings: run `megatron-prune "
                        "bench ... --out FILE.jsonl` without --no-layer-timings")  # fmt: skip
    return rows


def read_records(path: str | Path) -> list[dict]:
    """The bench records of a JSON-lines file, all timed at one sequence length."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--latency-table {path} does not exist (write it with `megatron-prune "
                        "bench ... --out FILE.jsonl`)")  # fmt: skip
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"--latency-table {path}:{number} is not JSON: give the file "
                            "`bench --out` wrote") from None  # fmt: skip
        if not isinstance(record, dict) or record.get("schema") != SCHEMA:
            raise UserError(f"--latency-table {path}:{number} is not a bench record "
                            f"(schema {SCHEMA})")  # fmt: skip
        records.append(record)
    if not records:
        raise UserError(f"--latency-table {path} is empty")
    keys = {(r["seq_len"], r["micro_batch_size"]) for r in records}
    if len(keys) > 1:
        raise UserError(f"--latency-table {path} mixes timings at (seq_len, micro batch) "
                        f"{sorted(keys)}: bench every model with the same --seq-len and "
                        "--micro-batch-size")  # fmt: skip
    return records


def fit_latency(path: str | Path) -> LatencyModel:
    """Fit the per-layer latency model to a bench table (see the module docstring)."""
    records = read_records(path)
    rows = _timed_rows(records, Path(path))
    seq_len, micro = records[0]["seq_len"], records[0]["micro_batch_size"]
    distinct = len({(a.head_dim, a.sliding_window, s) for a, s, _ in rows})
    ms = np.array([t for _, _, t in rows])
    for form in FORMS:  # the last, "flops" alone, is always taken when reached
        if len(form.split("+")) > distinct:
            continue
        x = np.array([_features(form, a, s, seq_len) for a, s, _ in rows])
        scale = np.abs(x).max(0)
        coef = np.linalg.lstsq(x / scale, ms, rcond=None)[0] / scale
        if form == FORMS[-1] or ((coef >= 0).all() and coef[-1] > 0):
            break
    error = float(np.max(np.abs(x @ coef - ms) / ms))
    return LatencyModel(form, tuple(float(c) for c in coef), int(seq_len), int(micro),
                        str(path), tuple(sorted({str(r.get("device")) for r in records})),
                        distinct, error)  # fmt: skip
