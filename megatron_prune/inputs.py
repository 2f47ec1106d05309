"""The user's own files (text, YAML targets and recipes) read with refusals that name the file and
the fix: bad encoding, YAML syntax, and unknown keys with the nearest valid one suggested."""

from __future__ import annotations

import codecs
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_prune.errors import DataError, UserError


def _not_utf8(what: str, path: Path, err: UnicodeDecodeError, offset: int = 0) -> DataError:
    return DataError(f"{what} {path} is not UTF-8 text ({err.reason} at byte "
                     f"{offset + err.start}): convert it to UTF-8 (iconv -t UTF-8)")  # fmt: skip


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``; ``what`` (a flag, "recipe") names it in errors."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(what, path, err) from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a folder, not a file") from None


def check_utf8(path: str | Path, what: str, chunk: int = 1 << 22) -> None:
    """Refuse a file that is not UTF-8, reading it in chunks (no whole copy in memory)."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes before this block
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            pending = len(decoder.getstate()[0])  # an incomplete character from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise _not_utf8(what, path, err, offset - pending) from None
            if not block:
                return
            offset += len(block)


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of ``path``; a syntax error is one line with its line and column."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    text = read_text(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{what} {path}: YAML syntax error{where} ({problem}); fix the "
                        "file") from None  # fmt: skip


def check_keys(given: Iterable[str], known: Iterable[str], where: str,
               error: type[UserError] = UserError) -> None:  # fmt: skip
    """Refuse keys not in ``known`` (raising ``error``), suggesting the nearest known key."""
    known = list(known)
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    parts = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        parts.append(f"{key!r} (did you mean {near[0]!r}?)" if near else repr(key))
    raise error(f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: "
                    f"{', '.join(parts)}; known keys: {', '.join(known)}")  # fmt: skip
