"""The file ``eval ppl --out FILE.json`` writes: the perplexity, what it was measured on, and the
model's parameter counts, so ``report`` can plot perplexity against size without the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_prune.checkpoint.atomic import write_text_atomic

RESULT_KIND = "megatron_prune.perplexity"  # how `report` recognises such a file


def perplexity_record(
    checkpoint: str | Path, data: str | Path, seq_len: int, max_tokens: int | None,
    result: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.plan.cost import block_params, model_params

    arch = CheckpointMeta.read(checkpoint).arch
    return {
        "kind": RESULT_KIND, **result, "checkpoint": str(Path(checkpoint).resolve()),
        "data": str(Path(data).resolve()), "seq_len": seq_len, "max_tokens": max_tokens,
        "params": model_params(arch), "block_params": block_params(arch),
    }  # fmt: skip


def write_result(path: str | Path, record: dict[str, Any]) -> None:
    """Write (or replace) the result file whole; its folder is created if needed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(path), json.dumps(record, indent=2))
