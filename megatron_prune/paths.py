"""Where a command may write, checked before any work.

Sources are never written: an output may not be, lie inside, or contain any input (checkpoint,
scores, data, target, recipe, teacher, student), compared after resolving symlinks and relative
paths, whatever ``--overwrite`` says. The scratch names beside an output (``OUT.partial``,
``OUT.old``, ``OUT.tmp``: deleted by a failed or replacing run) count as the output.

An output is never written by two runs at once: the command line holds ``OUT.lock`` (the pid,
host and run id of its holder) while it runs. A lock whose process is gone is stale and taken
over; a live one refuses the second run, naming the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from megatron_prune.errors import OutputError

# Every rank (and the launcher) of one command shares this id; a lock of the same run is ours.
RUN_ID_ENV = "MEGATRON_PRUNE_RUN_ID"
SCRATCH_SUFFIXES = ("", ".partial", ".old", ".tmp")
LOCK_SUFFIX = ".lock"


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with every symlink (of the part that exists) resolved."""
    return Path(os.path.expanduser(str(path))).resolve()


def source_path(spec: str | Path) -> Path:
    """The file or folder a source spec names (``gguf:FILE`` -> ``FILE``)."""
    text = str(spec)
    return Path(text[len("gguf:") :] if text.startswith("gguf:") else text)


Inputs = Mapping[str, str | Path | Iterable[str | Path] | None]  # flag -> path(s), None: unset


def check_not_input(out: str | Path, out_flag: str, inputs: Inputs) -> None:
    """Refuse an output that is, lies inside, or contains one of ``inputs`` (flag -> path(s))."""
    outs = [resolved(str(out) + suffix) for suffix in SCRATCH_SUFFIXES]
    for flag, value in inputs.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, Path)) else list(value)
        for given in values:
            src = resolved(source_path(given))
            for o in outs:
                if o == src:
                    how = "is"
                elif src in o.parents:
                    how = "would be written inside"
                elif o in src.parents:
                    how = "contains"
                else:
                    continue
                raise OutputError(
                    f"{out_flag} {out} {how} the input {flag} {given}: inputs are never "
                    "written or replaced (even with --overwrite); choose another output path"
                )


def check_writable(out: str | Path) -> None:
    """The output can be created: its nearest existing ancestor is a writable folder."""
    out = resolved(out)
    parent = _existing_ancestor(out)
    if not parent.is_dir():
        raise OutputError(f"cannot write {out}: {parent} is a file, not a folder; "
                          "choose an output path under a folder")  # fmt: skip
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: folder {parent} is read-only for this user; "
                          "choose an output path you can write")  # fmt: skip


def _existing_ancestor(out: Path) -> Path:
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_free_space(out: str | Path, need: int, what: str) -> None:
    """Refuse before any work when the file system ``out`` goes on has less free space than
    ``need`` bytes (an estimate of ``what``), instead of failing halfway through the write.
    An output being replaced stays on disk until the new one is complete, so its bytes do not
    count as free."""
    folder = _existing_ancestor(resolved(out))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OutputError(
            f"not enough free space for {out}: {what} needs about {_size(need)}, and {folder} "
            f"has {_size(free)} free; free some space or choose an output on another disk"
        )


# ---------------------------------------------------------------------------- output locks


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + LOCK_SUFFIX)


def current_run() -> str | None:
    """The id every process of this command shares (ours, or torchrun's), if any."""
    return os.environ.get(RUN_ID_ENV) or os.environ.get("TORCHELASTIC_RUN_ID")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _live_holder(lock: Path) -> dict | None:
    """The record of a lock held by a live process (None: no lock, or a stale one)."""
    try:
        record = json.loads(lock.read_text())
        pid, host = int(record["pid"]), str(record["host"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError):
        return {"pid": "?", "host": "?", "run": None}  # unreadable: someone's, being written
    if host == socket.gethostname() and not _alive(pid):
        return None
    return record


def _refusal(out: Path, lock: Path, holder: dict) -> OutputError:
    return OutputError(
        f"another run (pid {holder['pid']} on {holder['host']}) is writing {out}: wait for it to "
        f"finish, or delete the lock {lock} if no such run is alive"
    )


def check_unlocked(out: str | Path) -> None:
    """Refuse an output another live run holds (a lock of this run, or a stale one, is fine)."""
    lock = lock_path(out)
    holder = _live_holder(lock)
    if holder is not None and holder.get("run") != current_run():
        raise _refusal(Path(out), lock, holder)


def _acquire(out: Path) -> Path | None:
    """Take ``out``'s lock; None when this run holds it already."""
    lock = lock_path(out)
    lock.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run": current_run()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(lock)
            if holder is None:  # stale: its process is gone
                lock.unlink(missing_ok=True)
                continue
            if holder.get("run") == current_run():
                return None
            raise _refusal(out, lock, holder) from None
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return lock
    holder = _live_holder(lock) or {"pid": "?", "host": "?"}
    raise _refusal(out, lock, holder)


_HELD: list[Path] = []  # the locks this process holds now (a stop signal's handler frees them)


@contextlib.contextmanager
def output_locks(outs: Iterable[str | Path]) -> Iterator[None]:
    """Hold the locks of ``outs`` for the block (released on any exit but SIGKILL, which leaves
    a stale lock the next run takes over)."""
    taken: list[Path] = []
    try:
        for out in outs:
            lock = _acquire(Path(out))
            if lock is not None:
                taken.append(lock)
                _HELD.append(lock)
        yield
    finally:
        for lock in taken:
            lock.unlink(missing_ok=True)
            _HELD.remove(lock)


def release_held_locks() -> None:
    """Free every lock this process holds (before it exits at once on a stop signal)."""
    while _HELD:
        _HELD.pop().unlink(missing_ok=True)
