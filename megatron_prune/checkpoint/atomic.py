"""Outputs appear whole or not at all: work happens in ``DST.partial`` and is renamed into place
only when every rank has finished, so a failed run never leaves a half-written ``DST`` and never
touches an existing one unless ``--overwrite`` was given."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
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


def replace_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` whole or not at all: ``write`` fills a temporary file renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write the text file ``path`` whole or not at all."""
    replace_atomic(path, lambda tmp: tmp.write_text(text))


def publish_directory(scratch: Path, dst: Path) -> None:
    """Move the finished ``scratch`` folder to ``dst``, replacing an old ``dst`` only once the
    new one is complete (one process calls this)."""
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        dst.rename(old)
        scratch.rename(dst)
        shutil.rmtree(old)
    else:
        scratch.rename(dst)


def check_output(dst: Path, overwrite: bool) -> None:
    """Fail early, before any work, if ``dst`` exists and may not be replaced, cannot be created
    (its parent is a file or read-only), or another live run is writing it."""
    from megatron_prune.paths import check_unlocked, check_writable

    if dst.exists() and not overwrite:
        raise OutputExistsError(dst)
    check_writable(dst)
    check_unlocked(dst)


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
        publish_directory(scratch, dst)
    _barrier()
