"""The report page: what was found, each section with its plots, and what was missing."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from megatron_prune.report import plots
from megatron_prune.report.collect import RunContents

REPORT_FILE = "report.md"


class _Labels:
    """Short names for paths: relative to the report's input folder that holds them."""

    def __init__(self, dirs: list[Path]) -> None:
        self.roots = [d.resolve() for d in dirs]

    def __call__(self, path: str | Path) -> str:
        real = Path(path).resolve()
        for root in self.roots:
            if real == root:
                return real.name
            if root in real.parents:
                return real.relative_to(root).as_posix()
        return real.name

    @staticmethod
    def slug(label: str) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") or "run"


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M"


def _arch_line(arch) -> str:
    widths = arch.all_widths()
    ffn = sorted({w.ffn_hidden_size for w in widths})
    heads = sorted({w.num_attention_heads for w in widths})
    groups = sorted({w.num_query_groups for w in widths})

    def show(values: list[int]) -> str:
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    return (f"{arch.num_layers} layers, hidden {arch.hidden_size}, FFN {show(ffn)}, "
            f"heads {show(heads)} in {show(groups)} groups")  # fmt: skip


class _Page:
    def __init__(self, found: RunContents, folder: Path) -> None:
        self.found, self.folder = found, folder
        self.label = _Labels(found.dirs)
        self.lines: list[str] = []
        self.notes: list[str] = []  # things found but not drawn

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def image(self, name: str, draw, *args: Any) -> None:
        draw(*args, self.folder / name)
        self.add(f"![{name}]({name})", "")

    # ------------------------------------------------------------------------------ sections

    def perplexities(self) -> None:
        evals = self.found.evals
        if not evals:
            return
        self.add("## Perplexity vs parameters", "")
        rows, points = [], []
        for result in sorted(evals, key=lambda e: -e.record.get("params", 0)):
            r = result.record
            name = self.label(r["checkpoint"])
            points.append((name, r["params"], r["ppl"]))
            rows.append(f"| {name} | {_millions(r['params'])} | {_millions(r['block_params'])} "
                        f"| {r['ppl']:.2f} | {r['tokens']} | {Path(r['data']).name} "
                        f"| {r['seq_len']} |")  # fmt: skip
        self.image("ppl_vs_params.png", plots.ppl_vs_params, points)
        protocols = {(Path(e.record["data"]).name, e.record["seq_len"], e.record["tokens"])
                     for e in evals}  # fmt: skip
        if len(protocols) > 1:
            self.add("Note: these perplexities were not all measured on the same tokens "
                     "(see the data, seq-len and tokens columns).", "")  # fmt: skip
        self.add("| checkpoint | params | block params | perplexity | tokens | data | seq-len |",
                 "|---|---|---|---|---|---|---|", *rows, "")  # fmt: skip

    def widths(self) -> None:
        from megatron_prune.models.arch import ModelArch

        pruned = [c for c in self.found.checkpoints if c.pruned]
        if not pruned:
            return
        self.add("## Kept widths per layer", "")
        for ckpt in pruned:
            name = self.label(ckpt.path)
            source = ModelArch.from_dict(ckpt.provenance["source_arch"])
            kept = list(ckpt.provenance.get("kept_layers") or range(ckpt.arch.num_layers))
            options = ckpt.provenance.get("options") or {}
            switches = [k for k in ("clap", "slnp", "absorb_post_norms") if options.get(k)]
            dropped = [i for i in range(source.num_layers) if i not in kept]
            self.add(f"### {name}", "",
                     f"* source: {_arch_line(source)}",
                     f"* pruned: {_arch_line(ckpt.arch)}",
                     f"* block parameters: {_millions(_block_params(source))} -> "
                     f"{_millions(ckpt.block_params)} "
                     f"({ckpt.block_params / _block_params(source):.1%} kept)",
                     f"* dropped layers: {dropped or 'none'}; options: "
                     f"{', '.join(switches) or 'none'}", "")  # fmt: skip
            self.image(f"widths_{self.label.slug(name)}.png", plots.kept_widths, source,
                       ckpt.arch, kept)  # fmt: skip

    def scores(self) -> None:
        from safetensors.numpy import load_file

        if not self.found.scores:
            return
        self.add("## Importance scores", "")
        for folder in self.found.scores:
            name = self.label(folder.path)
            meta = folder.meta
            job = meta.get("job") or {}
            self.add(f"### {name}", "",
                     f"{meta.get('tokens', '?')} calibration tokens ({job.get('samples', '?')} x "
                     f"{job.get('seq_len', '?')}) from {Path(job.get('data', '?')).name}.", "")
            if not folder.tensors_file.is_file():
                self.notes.append(f"{name}: {folder.tensors_file.name} is missing")
                continue
            tables = load_file(str(folder.tensors_file))
            layers = (meta.get("arch") or {}).get("num_layers")
            per_layer = {}
            for key in sorted(tables):
                table = tables[key].astype(np.float64)
                if table.ndim == 2:
                    self.image(f"scores_{self.label.slug(name)}_{self.label.slug(key)}.png",
                               plots.score_heatmap, key, table)  # fmt: skip
                elif table.ndim == 1 and len(table) == layers:
                    per_layer[key] = table
            if per_layer:
                self.image(f"scores_{self.label.slug(name)}_per_layer.png",
                           plots.per_layer_scores, per_layer)  # fmt: skip
            flat = sorted(k for k, t in tables.items() if t.ndim == 1 and len(t) != layers)
            if flat:
                self.add(f"Not drawn (one value per hidden channel): {', '.join(flat)}.", "")

    def distillation(self) -> None:
        if not self.found.distills:
            return
        self.add("## Distillation", "")
        for run in self.found.distills:
            name = self.label(run.path)
            self.add(f"### {name}", "")
            if not run.history:
                self.add("metrics.jsonl holds no step yet.", "")
                continue
            c = run.config
            if c:
                teacher = Path(c["teacher"]).name if c.get("teacher") else "none (LM loss)"
                self.add(f"teacher {teacher}, student {Path(c.get('student', '?')).name}; "
                         f"{c.get('train_tokens', '?')} tokens, seq-len {c.get('seq_len', '?')}"
                         f", global batch {c.get('global_batch', '?')}, lr {c.get('lr', '?')}",
                         "")  # fmt: skip
            first, last = run.history[0], run.history[-1]
            rows = [f"| {k} | {first[k]:.4f} | {last[k]:.4f} |"
                    for k in plots.loss_names(run.history) if k in first and k in last]
            held = [r["eval_ppl"] for r in run.history if "eval_ppl" in r]
            if held:
                rows.append(f"| held-out perplexity | {held[0]:.2f} | {held[-1]:.2f} |")
            self.add(f"| metric | step {first['step']} | step {last['step']} |", "|---|---|---|",
                     *rows, "")  # fmt: skip
            self.image(f"distill_{self.label.slug(name)}.png", plots.distill_curves,
                       run.history)  # fmt: skip

    def plan(self) -> None:
        pruned = [c for c in self.found.checkpoints if c.pruned]
        if not (self.found.plans or pruned):
            return
        self.add("## Plan", "")
        for plan in self.found.plans:
            record = plan.record
            achieved = record.get("achieved") or {}
            self.add(f"### {self.label(plan.path)}", "",
                     f"strategy {record.get('strategy', '?')}, budget "
                     f"{record.get('budget', '?')}; achieved: "
                     + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                 for k, v in achieved.items()), "",
                     "```yaml", plan.text.rstrip(), "```", "")  # fmt: skip
        for ckpt in pruned:
            target = {k: v for k, v in (ckpt.provenance.get("target") or {}).items()
                      if v is not None}  # fmt: skip
            self.add(f"The target `prune` used for {self.label(ckpt.path)}:", "", "```yaml",
                     yaml.safe_dump(target, sort_keys=False, default_flow_style=None).rstrip(),
                     "```", "")  # fmt: skip

    def render(self) -> str:
        from megatron_prune import __version__

        found = self.found
        self.add("# megatron-prune report", "",
                 f"From {', '.join(f'`{d}`' for d in found.dirs)}; written by megatron-prune "
                 f"{__version__} at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.",
                 "", "Found: " + ", ".join([
                     f"{len(found.checkpoints)} checkpoint(s)", f"{len(found.evals)} "
                     "perplexity result(s)", f"{len(found.scores)} score folder(s)",
                     f"{len(found.distills)} distillation run(s)",
                     f"{len(found.plans)} plan file(s)", f"{len(found.exports)} Hugging Face "
                     "export(s)"]) + ".", "")  # fmt: skip
        for checkpoint in found.checkpoints:
            self.add(f"* checkpoint {self.label(checkpoint.path)}: "
                     f"{_arch_line(checkpoint.arch)}, {_millions(checkpoint.params)} parameters")
        for export in found.exports:
            self.add(f"* Hugging Face export {self.label(export)}")
        self.add("")
        self.perplexities()
        self.widths()
        self.scores()
        self.distillation()
        self.plan()
        missing = found.missing() + self.notes
        self.add("## Missing", "")
        self.add(*(f"* {line}" for line in missing) if missing else ["Nothing: every section "
                 "has data."])  # fmt: skip
        return "\n".join(self.lines) + "\n"


def _block_params(arch) -> int:
    from megatron_prune.plan.cost import block_params

    return block_params(arch)


def write_report(found: RunContents, folder: Path) -> Path:
    """Draw the plots into ``folder`` and write ``folder/report.md``; returns its path."""
    text = _Page(found, folder).render()
    (folder / REPORT_FILE).write_text(text)
    return folder / REPORT_FILE

