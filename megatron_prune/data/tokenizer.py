"""The tokenizer saved inside a checkpoint (Hugging Face ``tokenizer.json``), loaded with the
light ``tokenizers`` library so commands need not import transformers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from megatron_prune.checkpoint.metadata import CheckpointError, CheckpointMeta


@dataclass
class Tokenizer:
    backend: _HFTokenizer
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)


def load_tokenizer(checkpoint: str | Path) -> Tokenizer:
    meta = CheckpointMeta.read(checkpoint)
    record = meta.tokenizer
    path = Path(checkpoint) / record.get("path", "tokenizer") / "tokenizer.json"
    if not record or not path.is_file():
        if str(meta.provenance.get("source", "")).startswith("megatron-lm"):
            raise CheckpointError(
                f"{checkpoint} is a Megatron-LM checkpoint whose args name no local Hugging Face "
                f"tokenizer (--tokenizer-model): run `megatron-prune convert {checkpoint} NEW "
                "--tokenizer TOKENIZER_DIR` once and use NEW"
            )
        raise CheckpointError(
            f"{checkpoint} has no tokenizer: convert from a source that carries one"
        )
    return Tokenizer(_HFTokenizer.from_file(str(path)), record.get("bos_id"), record.get("eos_id"))
