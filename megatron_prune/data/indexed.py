"""Text or JSONL -> Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), the format
Megatron-LM's ``preprocess_data.py`` writes and ``GPTDataset`` reads.

Documents: one per JSONL line (its ``--json-key`` field), or, for plain text, one per block of
lines separated by blank lines. Each document is tokenized without special tokens and ends with
the end-of-document token (the tokenizer's EOS), as Megatron-LM's ``--append-eod`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch

from megatron_prune.data.tokenizer import Tokenizer
from megatron_prune.errors import DataError
from megatron_prune.progress import progress_bar


@dataclass(frozen=True)
class BuildReport:
    documents: int
    tokens: int
    prefix: str

    def to_dict(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "prefix": self.prefix}


def read_documents(path: Path, json_key: str = "text") -> Iterator[str]:
    """The documents of a .jsonl file (one per line) or a text file (blank-line separated)."""
    if path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if json_key not in record:
                    raise DataError(f"{path}:{number} has no {json_key!r} field (--json-key)")
                yield record[json_key]
        return
    block: list[str] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
    if block:
        yield "".join(block)


def token_dtype(vocab_size: int) -> type[numpy.number]:
    """The narrowest dtype Megatron's indexed datasets accept for this vocabulary."""
    return numpy.uint16 if vocab_size <= numpy.iinfo(numpy.uint16).max + 1 else numpy.int32


def build_indexed_dataset(
    tokenizer: Tokenizer, source: Path, prefix: Path, json_key: str = "text"
) -> BuildReport:
    """Tokenize ``source`` into ``prefix``.bin/.idx. Both appear only when complete: they are
    written under temporary names and renamed, the index last."""
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no EOS token to end documents with")
    vocab = tokenizer.backend.get_vocab_size()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = prefix.with_name(prefix.name + ".bin.tmp")
    tmp_idx = prefix.with_name(prefix.name + ".idx.tmp")
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # heavy import

    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=token_dtype(vocab))
    documents = tokens = 0
    try:
        for text in progress_bar(read_documents(source, json_key), "tokenizing", unit="doc"):
            ids = tokenizer.encode(text) + [tokenizer.eos_id]
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
            documents += 1
            tokens += len(ids)
        if documents == 0:
            raise DataError(f"{source} holds no documents")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, prefix.with_name(prefix.name + ".bin"))
        os.replace(tmp_idx, prefix.with_name(prefix.name + ".idx"))
    finally:
        for tmp in (tmp_bin, tmp_idx):
            tmp.unlink(missing_ok=True)
    return BuildReport(documents=documents, tokens=tokens, prefix=str(prefix))
