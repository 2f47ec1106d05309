"""Rank-0 progress bars (tqdm), silent on other ranks and when not wanted."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from megatron_prune.log import is_rank0

T = TypeVar("T")


def progress_bar(
    items: Iterable[T], desc: str, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    if not (enabled and is_rank0()):
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
