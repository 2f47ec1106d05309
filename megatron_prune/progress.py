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


class TokenCounter:
    """A rank-0 progress bar counting tokens (shows tokens/s); a no-op elsewhere."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled and is_rank0():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True)

    def update(self, tokens: int) -> None:
        if self.bar is not None:
            self.bar.update(tokens)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
