"""The self-description every checkpoint of this tool carries (``megatron_prune.json``): the
architecture, the layout it was written at, its tokenizer and where it came from. Later commands
read it instead of asking for model flags."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_prune.errors import CheckpointError
from megatron_prune.models.arch import ModelArch

METADATA_FILE = "megatron_prune.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    arch: ModelArch
    layout: dict[str, Any]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # The stored tensors' dtype (a bf16 / fp16 distillation saves its student so); every
    # command loads any of them into the dtype it computes in.
    dtype: str = "fp32"

    def to_json(self) -> str:
        data = asdict(self)
        data["arch"] = self.arch.to_dict()
        return json.dumps(data, indent=2, sort_keys=True)

    def write(self, directory: Path) -> None:
        from megatron_prune.checkpoint.atomic import write_text_atomic

        write_text_atomic(directory / METADATA_FILE, self.to_json())

    @classmethod
    def read(cls, directory: str | Path) -> CheckpointMeta:
        path = Path(directory) / METADATA_FILE
        if not Path(directory).is_dir():
            raise CheckpointError(f"{directory} is not a directory")
        if not path.is_file():
            from megatron_prune.checkpoint.megatron_lm_format import (
                is_megatron_lm_layout,
                read_meta,
            )

            if is_megatron_lm_layout(directory):  # Megatron-LM's --save: torch_dist or legacy
                return read_meta(directory)
            raise CheckpointError(
                f"{directory} has no {METADATA_FILE}: not a checkpoint written by megatron-prune "
                "(convert it first with `megatron-prune convert`)"
            )
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: format version {data.get('format_version')} is not {FORMAT_VERSION}"
            )
        return cls(
            arch=ModelArch.from_dict(data["arch"]),
            layout=data["layout"],
            tokenizer=data.get("tokenizer", {}),
            provenance=data.get("provenance", {}),
            dtype=data.get("dtype", "fp32"),
        )


def provenance(source: str, **extra: Any) -> dict[str, Any]:
    from megatron_prune import __version__

    return {
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": f"megatron-prune {__version__}",
        **extra,
    }
