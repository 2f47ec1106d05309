"""The report's PNG plots (matplotlib's object API: no pyplot state, no display needed).

Each function draws one figure from plain numbers and writes it to ``path``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

DPI = 110
# Keys of a metrics.jsonl record that are not losses.
_NOT_LOSSES = {"step", "grad_norm", "lr", "step_seconds", "eval_ppl"}


def _figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (7.0, 4.0)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def ppl_vs_params(points: list[tuple[str, int, float]], path: Path) -> Path:
    """Held-out perplexity (log scale) against total parameters, one labelled point per model."""
    fig, axes = _figure()
    ax = axes[0][0]
    for label, params, ppl in points:
        ax.scatter(params / 1e6, ppl, s=30)
        ax.annotate(label, (params / 1e6, ppl), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def kept_widths(source, pruned, kept_layers: list[int], path: Path) -> Path:
    """Per source layer: FFN width, query heads and query groups before (outline) and after
    pruning (filled); a dropped layer keeps nothing."""
    names = (("ffn_hidden_size", "FFN width"), ("num_attention_heads", "query heads"),
             ("num_query_groups", "query groups"))  # fmt: skip
    fig, axes = _figure(len(names), 1, (7.0, 6.0))
    x = np.arange(source.num_layers)
    position = {src: i for i, src in enumerate(kept_layers)}
    for (field_name, title), row in zip(names, axes, strict=True):
        ax = row[0]
        before = [getattr(source.widths(i), field_name) for i in x]
        after = [getattr(pruned.widths(position[i]), field_name) if i in position else 0
                 for i in x]  # fmt: skip
        ax.bar(x, before, color="none", edgecolor="0.5", label="source")
        ax.bar(x, after, color="tab:blue", alpha=0.8, label="kept")
        dropped = [i for i in x if i not in position]
        if dropped:
            ax.scatter(dropped, [0] * len(dropped), marker="x", color="tab:red",
                       label="layer dropped", zorder=3)  # fmt: skip
        ax.set_ylabel(title)
        ax.set_xticks(x if len(x) <= 32 else x[::2])
    axes[0][0].legend(fontsize=7, loc="upper right")
    axes[-1][0].set_xlabel("source layer")
    return _save(fig, path)


def score_heatmap(name: str, table: np.ndarray, path: Path) -> Path:
    """A [layers, units] score table, each layer divided by its largest score (units are ranked
    within a layer, so this is what pruning sees)."""
    peak = np.abs(table).max(axis=1, keepdims=True)
    normed = np.divide(table, peak, out=np.zeros_like(table, dtype=float), where=peak > 0)
    fig, axes = _figure(size=(7.0, 3.5))
    ax = axes[0][0]
    image = ax.imshow(normed, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel(f"unit ({table.shape[1]})")
    ax.set_ylabel("layer")
    ax.set_title(f"{name} (each layer / its maximum)", fontsize=9)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def per_layer_scores(series: dict[str, np.ndarray], path: Path) -> Path:
    """Scores with one value per layer (Block Influence, post-norm statistics), one line each."""
    fig, axes = _figure(len(series), 1, (7.0, 1.8 * len(series) + 0.6))
    for (name, values), row in zip(series.items(), axes, strict=True):
        row[0].plot(np.arange(len(values)), values, marker="o", markersize=3)
        row[0].set_ylabel(name, fontsize=7)
        row[0].grid(True, alpha=0.3)
    axes[-1][0].set_xlabel("layer")
    return _save(fig, path)


def loss_names(history: list[dict[str, Any]]) -> list[str]:
    names = {k for r in history for k, v in r.items() if isinstance(v, int | float)}
    return sorted(names - _NOT_LOSSES)


def distill_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Training losses per step and, when the run evaluated, held-out perplexity per step."""
    held_out = [(r["step"], r["eval_ppl"]) for r in history if "eval_ppl" in r]
    fig, axes = _figure(1, 2 if held_out else 1, (9.0 if held_out else 6.0, 3.5))
    ax = axes[0][0]
    for name in loss_names(history):
        steps = [r["step"] for r in history if name in r]
        ax.plot(steps, [r[name] for r in history if name in r], marker=".", label=name)
    ax.set_xlabel("step")
    _integer_steps(ax)
    ax.set_ylabel("training loss (per token)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    if held_out:
        ax = axes[0][1]
        ax.plot(*zip(*held_out, strict=True), marker="o", color="tab:green")
        ax.set_xlabel("step")
        _integer_steps(ax)
        ax.set_ylabel("held-out perplexity")
        ax.grid(True, alpha=0.3)
    return _save(fig, path)


def held_out_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """Held-out perplexity (log scale) against training tokens, one line per run, so runs that
    share a budget compare on one axis (the recovery study's figure)."""
    fig, axes = _figure()
    ax = axes[0][0]
    for label, points in curves.items():
        tokens, ppl = zip(*points, strict=True)
        ax.plot(np.asarray(tokens) / 1e3, ppl, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
