"""The ``plan`` stage: checks, the allocation, and the plan file.

A plan file is a target (what ``prune --target`` reads) plus a ``plan:`` record of how it was
made, which ``load_target`` skips::

    plan:
      format_version: 1
      strategy: alpha
      budget: params=0.5
      achieved: {params: 0.4991, flops: 0.5123, latency: 0.5123, model_params: 0.63, ...}
      ...
    hidden_size: 576
    num_layers: 30
    ffn_hidden_size: [732, 732, 780, ...]   # one per layer, or one value for all
    num_attention_heads: [6, 3, 6, ...]
    num_query_groups: 3
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from megatron_prune.checkpoint.atomic import check_output, write_text_atomic
from megatron_prune.errors import OutputError, UserError
from megatron_prune.models.arch import PER_LAYER, ModelArch
from megatron_prune.plan import strategies
from megatron_prune.plan.cost import (
    DEFAULT_SEQ_LEN,
    METRICS,
    Budget,
    LayerShape,
    blocks_cost,
    layer_shapes,
    parse_budget,
)
from megatron_prune.plan.target import PLAN_KEY, load_target

if TYPE_CHECKING:
    from megatron_prune.plan.latency import LatencyModel

PLAN_FORMAT_VERSION = 1


@dataclass
class PlanInputs:
    """Everything :func:`make_plan` needs, checked."""

    source: ModelArch
    budget: Budget
    strategy: str
    dims: tuple[str, ...]
    tp: int
    pp: int
    seq_len: int
    alpha_eps: float
    scores: dict | None = None
    paths: dict[str, str | None] = field(default_factory=dict)  # checkpoint, scores: for the record
    tyr: Any = None  # TyrSettings (strategy tyr)
    data: Path | None = None  # tyr's calibration text
    resume: bool = False  # tyr: continue the search in PLAN.tyr/
    out: Path | None = None


@dataclass
class Plan:
    target: dict[str, Any]  # the keys load_target reads
    record: dict[str, Any]  # how it was made (the ``plan:`` mapping)

    def to_yaml(self) -> str:
        head = ("# megatron-prune plan: a pruning target; use it with "
                "`megatron-prune prune CKPT --scores DIR --target THIS_FILE`\n")  # fmt: skip
        body = yaml.safe_dump({PLAN_KEY: self.record, **self.target}, sort_keys=False,
                              default_flow_style=None, width=100)  # fmt: skip
        return head + body


def check_plan_inputs(checkpoint: str | Path, scores: str | Path | None, out: str | Path, *,
                      budget: str | Budget, strategy: str = "uniform", tp: int = 1, pp: int = 1,
                      prune: str | tuple[str, ...] | None = None,
                      alpha_eps: float = strategies.DEFAULT_ALPHA_EPS,
                      seq_len: int = DEFAULT_SEQ_LEN, overwrite: bool = False,
                      data: str | Path | None = None, tyr: Any = None,
                      resume: bool = False,
                      latency_table: str | Path | None = None) -> PlanInputs:  # fmt: skip
    """Every check of ``plan`` (no weights are read): bad input raises UserError.
    ``latency_table``: a ``bench --out`` file that calibrates a latency budget."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    if strategy not in strategies.STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: choose one of {strategies.STRATEGIES}")
    if strategy == "tyr":
        tyr = _check_tyr(data, tyr, prune)
    parsed = parse_budget(budget)
    if latency_table is not None:
        from megatron_prune.plan.latency import fit_latency

        if parsed.metric != "latency":
            raise UserError(f"--latency-table calibrates latency budgets, not {parsed}: use "
                            "--budget latency=FRACTION")  # fmt: skip
        parsed = replace(parsed, latency=fit_latency(latency_table))
    dims = strategies.parse_dims(prune or strategies.DEFAULT_DIMS)
    for name, value in (("--tp", tp), ("--pp", pp), ("--seq-len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} {value!r}: must be a positive integer")
    if not 0 <= alpha_eps < 1:
        raise UserError(f"--alpha-eps {alpha_eps}: must be in [0, 1)")
    out = Path(out)
    check_output(out, overwrite)
    if not out.parent.is_dir():
        raise OutputError(f"--out {out}: folder {out.parent} does not exist")
    meta = CheckpointMeta.read(checkpoint)
    if meta.arch.heterogeneous:
        raise UserError(f"{checkpoint} already has per-layer widths: plan from the uniform "
                        "source model (its scores are [layers, units] tables)")  # fmt: skip
    table = None
    if scores is not None:
        from megatron_prune.importance.score_files import load_scores

        table = load_scores(scores, meta.arch)
    _check_tyr_scores(tyr, table)
    if strategy == "alpha":
        if table is None:
            raise UserError("--strategy alpha needs --scores (a folder scored with --metrics esd)")
        strategies.block_alphas(table)  # the alphas are there and finite
    paths = {"checkpoint": str(Path(checkpoint).resolve()),
             "scores": None if scores is None else str(Path(scores).resolve())}  # fmt: skip
    return PlanInputs(meta.arch, parsed, strategy, dims, tp, pp, seq_len, alpha_eps, table, paths,
                      tyr, None if data is None else Path(data), resume, out)  # fmt: skip


def _check_tyr(data: str | Path | None, settings: Any, prune: str | tuple[str, ...] | None):
    """tyr's own inputs: calibration text, settings, the dimensions it can search."""
    from megatron_prune.inputs import check_utf8
    from megatron_prune.plan.tyr.job import TYR_DIMS, TyrSettings

    if data is None:
        raise UserError("--strategy tyr needs --data TEXT (calibration text for the supernet "
                        "and the KL fitness)")  # fmt: skip
    if not Path(data).is_file() or Path(data).stat().st_size == 0:
        raise UserError(f"--data {data}: not a readable, non-empty text file")
    check_utf8(Path(data), "--data")
    extra = sorted(set(strategies.parse_dims(prune or strategies.DEFAULT_DIMS)) - set(TYR_DIMS))
    if extra:
        raise UserError(f"--strategy tyr searches {list(TYR_DIMS)} per layer; {extra} are not "
                        "searched: drop them from --prune")  # fmt: skip
    settings = settings or TyrSettings()
    settings.check()
    return settings


def _check_tyr_scores(settings: Any, table: dict | None) -> None:
    """``--tyr-local-pruner scores`` chooses units as ``prune`` will: it needs those scores."""
    from megatron_prune.plan.tyr.job import SCORE_NAMES

    if settings is None or settings.local_pruner != "scores":
        return
    missing = [n for n in SCORE_NAMES.values() if table is None or n not in table]
    if missing:
        raise UserError(f"--tyr-local-pruner scores needs --scores with {missing} (score with "
                        "--metrics head,neuron)")  # fmt: skip


def _collapse(target: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists whose values are all equal become one value (a uniform model)."""
    out = dict(target)
    for key in PER_LAYER:
        value = out.get(key)
        if isinstance(value, (list, tuple)) and len(set(value)) == 1:
            out[key] = value[0]
        elif isinstance(value, (list, tuple)):
            out[key] = [int(v) for v in value]
    return out


def pruned_shapes(source: ModelArch, target: dict[str, Any]) -> tuple[list[LayerShape], float]:
    """The pruned blocks as cost-model shapes, and the factor their cost is multiplied by.

    Without depth pruning, kept layer k is source layer k. With it (uniform widths only), Block
    Influence picks the layers later: the source's layers with the new widths, times
    ``num_layers / L``, stand in (exact unless local and global layers mix).
    """
    layers = target.get("num_layers", source.num_layers)
    hidden = target.get("hidden_size", source.hidden_size)
    values = {k: target.get(k, getattr(source, k)) for k in PER_LAYER}
    per_layer = {k: (v if isinstance(v, (list, tuple)) else [v] * layers)
                 for k, v in values.items()}  # fmt: skip
    shapes = []
    for i, s in enumerate(layer_shapes(source)):
        k = i if layers == source.num_layers else 0
        shapes.append(LayerShape(hidden, per_layer["ffn_hidden_size"][k],
                                 per_layer["num_attention_heads"][k],
                                 per_layer["num_query_groups"][k], s.local))  # fmt: skip
    return shapes, layers / source.num_layers


def plan_fractions(source: ModelArch, target: dict[str, Any], seq_len: int,
                   latency: LatencyModel | None = None) -> dict[str, float]:  # fmt: skip
    """The pruned/dense ratio of each cost: blocks (params, flops, latency: the budgets; latency
    by the fitted ``latency`` model when given) and the whole model (model_params,
    model_flops: embedding and output layer included)."""
    shapes, scale = pruned_shapes(source, target)
    dense_shapes = layer_shapes(source)
    out = {}
    for m in METRICS:
        budget = Budget(m, 1.0, latency)
        out[m] = (scale * budget.blocks_cost(source, shapes, seq_len)
                  / budget.blocks_cost(source, dense_shapes, seq_len))  # fmt: skip
    hidden, vocab = shapes[0].hidden, source.padded_vocab_size
    embed = vocab * (1 if source.tie_embeddings else 2) + 1
    pruned_p = scale * blocks_cost(source, "params", shapes, 0) + embed * hidden
    dense_p = blocks_cost(source, "params", dense_shapes, 0) + embed * source.hidden_size
    pruned_f = scale * blocks_cost(source, "flops", shapes, seq_len) + 2 * hidden * vocab
    dense_f = blocks_cost(source, "flops", dense_shapes, seq_len) + 2 * source.hidden_size * vocab
    out.update(model_params=pruned_p / dense_p, model_flops=pruned_f / dense_f)
    return {k: round(float(v), 6) for k, v in out.items()}


def make_plan(inputs: PlanInputs, layout=None, device: str | None = None) -> Plan:
    """Run the strategy, validate the target as ``prune`` will (``load_target`` at the layout)
    and check the budget by the cost model. ``layout`` (a ``ParallelLayout``) and ``device``:
    where tyr's search runs (every rank of the layout calls this)."""
    from megatron_prune import __version__

    i = inputs
    extra: dict[str, Any] = {}
    if i.strategy == "uniform":
        target = strategies.uniform(i.source, i.budget, i.dims, i.tp, i.pp, i.seq_len)
    elif i.strategy == "tyr":
        from megatron_prune.plan.tyr.job import run_tyr

        out = i.out or Path("plan.yaml")
        target, extra["tyr"] = run_tyr(i, i.tyr, i.data, out.with_name(out.name + ".tyr"),
                                       i.resume, layout, device)  # fmt: skip
    else:
        target = strategies.alpha(i.source, i.budget, i.scores or {}, i.dims, i.tp, i.pp,
                                  i.seq_len, i.alpha_eps)  # fmt: skip
    target = _collapse(target)
    load_target(target, i.source, i.tp, i.pp)  # the final word on validity
    achieved = plan_fractions(i.source, target, i.seq_len, i.budget.latency)
    if not i.budget.met_by(achieved[i.budget.metric]):  # a strategy bug, not bad input
        raise AssertionError(f"plan misses {i.budget}: {achieved}")
    record: dict[str, Any] = {
        "format_version": PLAN_FORMAT_VERSION,
        "strategy": i.strategy,
        "budget": str(i.budget),
        "budget_meaning": f"keep {i.budget.keep:g} of the dense transformer blocks' "
                          f"{i.budget.metric} (within {strategies.TOLERANCE:.0%})",
        "achieved": achieved,
        "cost_model": ("analytic (latency = block FLOPs per token)" if i.budget.latency is None
                       else i.budget.latency.record()),
        "seq_len": i.seq_len,
        "prune": list(i.dims),
        "validated_at": {"tp": i.tp, "pp": i.pp},
        "source_checkpoint": i.paths.get("checkpoint"),
        "scores": i.paths.get("scores"),
        "tool": f"megatron-prune {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if i.strategy == "alpha":
        record["alpha_eps"] = i.alpha_eps
    record.update(extra)
    if target.get("num_layers", i.source.num_layers) < i.source.num_layers:
        record["note"] = "prune drops the layers with the lowest layer/block_influence score"
    return Plan(target, record)


def write_plan(plan: Plan, out: str | Path) -> Path:
    write_text_atomic(Path(out), plan.to_yaml())
    return Path(out)
