"""Ranks die with the command that started them.

torch's elastic agent starts each rank in a session of its own, so a signal to the user's
process group (Ctrl-C, ``kill -9 -PGID``) never reaches the ranks, and ranks whose launcher was
killed with SIGKILL finish their job and write its output. Each rank the command line launches
asks the kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) to kill it when its launcher dies, and passes
the same request on to the processes it forks (checkpoint writer helpers). Elsewhere a watchdog
thread polls the parent pid.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
# The launcher's pid, set by the command line for the ranks it starts.
LAUNCHER_PID_ENV = "MEGATRON_PRUNE_LAUNCHER_PID"
# from_main_thread: set in the parent just before a fork, read in the child
_fork = {"from_main_thread": False, "registered": False}


def _request_death_signal() -> bool:
    """Ask the kernel to SIGKILL this process when its parent thread exits (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int, interval: float = 0.5) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(128 + int(signal.SIGKILL))

    threading.Thread(target=watch, name="megatron-prune-parent-watchdog", daemon=True).start()


def die_with_parent(parent: int) -> None:
    """Make this process (and, on Linux, what it forks later) die when ``parent`` does."""
    if not _request_death_signal():
        _watch_parent(parent)
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(128 + int(signal.SIGKILL))
    children_die_with_this_process()


def children_die_with_this_process() -> None:
    """Processes forked later (from the main thread) get a death signal tied to this one."""
    if _fork["registered"]:
        return
    _fork["registered"] = True
    # The death signal follows the thread that forked: only children forked by the main thread
    # (which lives as long as the rank) get it; a helper thread's fork would die with the thread.
    os.register_at_fork(before=_note_forking_thread, after_in_child=_child_dies_with_rank)


def _note_forking_thread() -> None:
    _fork["from_main_thread"] = threading.current_thread() is threading.main_thread()


def _child_dies_with_rank() -> None:
    if _fork["from_main_thread"]:
        _request_death_signal()


def die_with_launcher() -> None:
    """In a rank the command line launched: die with the launcher; in a rank an external
    torchrun started (``launch/*.sh``): die with its elastic agent, the parent (no-op elsewhere).
    Without this, the ranks of a SIGKILLed torchrun keep running, and on a multi-node job hold
    the other nodes' ranks in their collectives."""
    parent = os.environ.get(LAUNCHER_PID_ENV)
    if parent:
        die_with_parent(int(parent))
    elif "TORCHELASTIC_RUN_ID" in os.environ and os.getppid() != 1:
        die_with_parent(os.getppid())
