"""Test helpers: run scripts under torchrun and the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def torchrun(
    worker: str, nproc: int, *args: str, timeout: int = 900, python: str = sys.executable
) -> str:
    """Run ``tests/workers/<worker>`` under torchrun; fail with its output if any rank fails.
    ``python`` may be another virtualenv's interpreter (tests across megatron-core versions)."""
    cmd = [
        python, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", str(WORKERS / worker), *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        raise AssertionError(f"{worker} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``megatron-prune ARGS`` in a subprocess (exit code and output are what the test checks)."""
    cmd = [sys.executable, "-m", "megatron_prune.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def last_json(stdout: str) -> dict:
    """The last JSON object a command printed."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON line in output:\n{stdout}")
