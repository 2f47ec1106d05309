"""``bench``'s output: one JSON record per model (schema :data:`SCHEMA`) and a human table.

A record (``plan --latency-table`` is to read these; the keys are the contract)::

    schema        "megatron_prune.bench/1"
    model         the checkpoint path or the --shape given; source: "checkpoint" | "shape"
    arch          ModelArch.to_dict() of the model
    params, block_params   every parameter / the transformer blocks' (plan's cost model)
    device, device_kind, dtype, attention_backend, layout {tp, pp, vpp, sequence_parallel},
    world_size, data_parallel, batch_size, seq_len, micro_batch_size, warmup, iters
    peak_tflops   the device's dense peak used for MFU (null: unknown, fp32 or CPU)
    prefill, decode, train    one phase each (absent when not run):
        seconds           median seconds of one call (slowest rank)
        tokens            tokens per call, all data-parallel replicas together
        tokens_per_s      tokens / seconds
        flops_per_token   model FLOPs per token (bench.flops, = plan's cost model)
        tflops            tokens_per_s x flops_per_token / 1e12, the whole world
        mfu               tflops / (peak_tflops x world_size); null without a peak
      decode adds prompt_len, new_tokens, method; train adds optimizer; a phase that cannot
      run at the layout is {"skipped": reason}
    layers        [{hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, local,
                    layers: [0-based indices], forward_ms}]: a layer's forward on
                  [micro_batch_size, seq_len] tokens, median over its layers and calls
    layer_forward_ms   {"0": ms, "1": ms, ...}, every layer
    reference     the first model of the run; vs_reference (every model, the first too):
        param_ratio                  reference block_params / block_params
        <phase>_speedup              tokens_per_s / the reference's
        <phase>_speedup_per_param    speedup / param_ratio (1.0: speed scales with parameters)
"""

from __future__ import annotations

from typing import Any

SCHEMA = "megatron_prune.bench/1"


def phase_record(seconds: float, tokens: int, flops_per_token: float, world_size: int,
                 peak: float | None, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """One phase's figures from its median time and token count."""
    tokens_per_s = tokens / seconds
    tflops = tokens_per_s * flops_per_token / 1e12
    mfu = None if peak is None else tflops / (peak * world_size)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens_per_s,
            "flops_per_token": flops_per_token, "tflops": tflops, "mfu": mfu,
            **extra}  # fmt: skip


def add_comparison(records: list[dict[str, Any]], phases: tuple[str, ...]) -> None:
    """Give every record its ratios against the first (the reference: the dense model)."""
    ref = records[0]
    for rec in records:
        param_ratio = ref["block_params"] / rec["block_params"]
        cmp: dict[str, Any] = {"param_ratio": param_ratio}
        for phase in phases:
            mine, theirs = rec.get(phase, {}), ref.get(phase, {})
            if "tokens_per_s" in mine and "tokens_per_s" in theirs:
                speedup = mine["tokens_per_s"] / theirs["tokens_per_s"]
                cmp[f"{phase}_speedup"] = speedup
                cmp[f"{phase}_speedup_per_param"] = speedup / param_ratio
        rec["reference"] = ref["model"]
        rec["vs_reference"] = cmp


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict[str, Any]], phases: tuple[str, ...]) -> str:
    """A Markdown table: one row per model, tokens/s, TFLOP/s and MFU per phase, the ratios."""
    head = ["model", "block params"]
    for phase in phases:
        head += [f"{phase} tok/s", f"{phase} TFLOP/s", f"{phase} MFU"]
    head += ["param ratio"] + [f"{p} speed-up / param ratio" for p in phases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        row = [str(rec["model"]), f"{rec['block_params'] / 1e6:.1f}M"]
        for phase in phases:
            p = rec.get(phase, {})
            if "skipped" in p:
                row += ["skipped", "-", "-"]
                continue
            row += [_fmt(p.get("tokens_per_s"), ".1f"), _fmt(p.get("tflops"), ".3g"),
                    _fmt(p.get("mfu"), ".1%")]  # fmt: skip
        cmp = rec["vs_reference"]
        row += [f"{cmp['param_ratio']:.2f}"]
        row += [_fmt(cmp.get(f"{p}_speedup_per_param"), ".2f") for p in phases]
        lines.append("| " + " | ".join(row) + " |")
    first = records[0]
    lines.append(
        f"device {first['device']}, {first['dtype']}, attention {first['attention_backend']}, "
        f"batch {first['batch_size']} x {first['seq_len']} tokens, world {first['world_size']}"
        f"; reference: {first['model']}"
    )
    return "\n".join(lines)
