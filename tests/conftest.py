"""Shared fixtures: the real models and texts that install from package registries."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def austen_eval_text() -> Path:
    from megatron_prune.data.corpus import cache_dir, write_splits

    return write_splits(cache_dir() / "text")[1]


@pytest.fixture(scope="session")
def austen_calibration_text() -> Path:
    from megatron_prune.data.corpus import cache_dir, write_splits

    return write_splits(cache_dir() / "text")[0]
