"""Outputs appear whole or not at all: work happens in ``DST.partial`` and is renamed into place
only when every rank has finished, so a failed run never leaves a half-written ``DST`` and never
touches an existing one unless ``--overwrite`` was given."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_prune.errors import OutputError


class OutputExistsError(OutputError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists; pass --overwrite to replace it")


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def is_writer() -> bool:
    """True on the one process that writes files every rank would write identically."""
    return _rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed into place)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_output(dst: Path, overwrite: bool) -> None:
    """Fail early, before any work, if ``dst`` exists and may not be replaced."""
    if dst.exists() and not overwrite:
        raise OutputExistsError(dst)


@contextlib.contextmanager
def atomic_directory(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch directory that becomes ``dst`` when the block succeeds on every rank.

    Collective when torch.distributed is initialised: all ranks must enter and leave together.
    """
    dst = Path(dst)
    check_output(dst, overwrite)
    scratch = dst.with_name(dst.name + ".partial")
    if _rank() == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    _barrier()
    try:
        yield scratch
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    _barrier()
    if _rank() == 0:
        if dst.exists():
            old = dst.with_name(dst.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            dst.rename(old)
            scratch.rename(dst)
            shutil.rmtree(old)
        else:
            scratch.rename(dst)
    _barrier()
