"""A score folder on disk (``scores.safetensors`` + ``meta.json``) and its reader, apart from
the scoring job, so the commands that only read scores (``prune``, ``plan``, ``sparsify``)
check them without importing megatron-core."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_prune.errors import ScoreError
from megatron_prune.models.arch import ModelArch

SCORES_FILE, META_FILE = "scores.safetensors", "meta.json"
FORMAT_VERSION = 1


def load_scores(directory: str | Path, arch: ModelArch | None = None) -> dict[str, torch.Tensor]:
    """Read a score folder; with ``arch``, refuse scores computed for another model."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ScoreError(f"{directory} holds no scores ({META_FILE} missing)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScoreError(f"{meta_path} is damaged ({err}): score again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ScoreError(
            f"{directory}: score format version {meta.get('format_version')} is not "
            f"{FORMAT_VERSION} (written by another megatron-prune version): score again"
        )
    if arch is not None:
        theirs = ModelArch.from_dict(meta["arch"])
        if theirs != arch:
            diff = {k: (v, getattr(arch, k)) for k, v in theirs.to_dict().items()
                    if getattr(arch, k) != v}  # fmt: skip
            raise ScoreError(
                f"scores in {directory} were computed for a {theirs.family} model that differs "
                f"from this {arch.family} checkpoint: {diff} (score this checkpoint first)"
            )
    scores_path = directory / SCORES_FILE
    if not scores_path.is_file():
        raise ScoreError(f"{directory} holds no scores ({SCORES_FILE} missing): score again")
    try:
        return load_file(str(scores_path))
    except Exception as err:  # safetensors raises its own error types for short or bad files
        raise ScoreError(f"{scores_path} is truncated or damaged ({err}): score again") from None
