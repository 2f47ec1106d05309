"""Two nodes on one machine: two launchers joined by a static rendezvous on 127.0.0.1, one rank
each, as a multi-node job runs them (one line per node). ``score`` through the command line's
own ``--nnodes`` relaunch and ``distill`` through ``launch/multi_node_cuda.sh`` (torchrun; the
ranks on the CPU) give the single-node results at the same layout (TP=2 across the nodes); a
node whose launcher is SIGKILLed takes the other node down within a bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_prune.paths import RUN_ID_ENV
from tests.helpers import REPO
from tests.helpers import cli as cli_subprocess
from tests.test_reliability import _alive, _children, _digest, _text, _wait_for
from tests.tiny_models import make_hf_model, save_hf_model, save_word_tokenizer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

SCORE = ["--samples", "4", "--seq-len", "16", "--tp", "2"]
DISTILL = ["--train-tokens", "256", "--seq-len", "32", "--global-batch", "4", "--lm-weight",
           "0.5", "--lr", "1e-3", "--tp", "2"]  # fmt: skip


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Qwen2 checkpoint (teacher and student of the distillation) and its dataset."""
    tmp = tmp_path_factory.mktemp("multinode")
    (tmp / "calib.txt").write_text(_text(2000))
    hf = save_hf_model(make_hf_model("qwen2", seed=5), tmp / "hf")
    save_word_tokenizer(hf, (tmp / "calib.txt").read_text())
    _ok(cli_subprocess("convert", str(hf), str(tmp / "ckpt")))
    build = ["data", "build", "--tokenizer", str(tmp / "ckpt"), "--input", str(tmp / "calib.txt")]
    _ok(cli_subprocess(*build, "--output", str(tmp / "data" / "train")))
    return tmp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Each "node" sees LOCAL_WORLD_SIZE=1 and would take every core (accelerator.py): two such
    # nodes on one machine oversubscribe it (10-30x slower steps). One thread per rank instead.
    env["MEGATRON_PRUNE_KEEP_THREADS"] = "1"
    env.pop(RUN_ID_ENV, None)
    return env


def _start_nodes(cmd_of_rank, env_of_rank=lambda rank: {}) -> list[subprocess.Popen]:
    return [subprocess.Popen(cmd_of_rank(rank), env=_node_env(**env_of_rank(rank)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in (0, 1)]  # fmt: skip


def _finish(nodes: list[subprocess.Popen], timeout: float = 600) -> list[str]:
    outputs = [node.communicate(timeout=timeout) for node in nodes]
    for rank, (node, (_, stderr)) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}: {stderr[-3000:]}"
    return [stdout for stdout, _ in outputs]


def _cli_nodes(argv: list[str]) -> list[subprocess.Popen]:
    """``megatron-prune ARGV`` on two nodes through the command line's own relaunch."""
    port = str(_free_port())
    flags = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", port]
    return _start_nodes(lambda rank: [sys.executable, "-m", "megatron_prune.cli", *argv, *flags,
                                      "--node-rank", str(rank)])  # fmt: skip


def _script_nodes(argv: list[str]) -> list[subprocess.Popen]:
    """``launch/multi_node_cuda.sh ARGV`` on two nodes (torchrun), the ranks on the CPU."""
    port = str(_free_port())
    return _start_nodes(
        lambda rank: [str(REPO / "launch" / "multi_node_cuda.sh"), *argv],
        lambda rank: {"NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": port, "GPUS_PER_NODE": "1", "MEGATRON_PRUNE_DEVICE": "cpu"},
    )  # fmt: skip


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_give_the_single_node_results(tiny):
    from safetensors.torch import load_file

    ck, data = tiny / "ckpt", tiny / "data" / "train"
    before = _digest(ck)
    score = ["score", str(ck), "--data", str(tiny / "calib.txt"), *SCORE]
    _ok(cli_subprocess(*score, "--out", str(tiny / "s_one")))
    _finish(_cli_nodes([*score, "--out", str(tiny / "s_two")]))
    one = load_file(str(tiny / "s_one" / "scores.safetensors"))
    two = load_file(str(tiny / "s_two" / "scores.safetensors"))
    assert set(one) == set(two) and len(one) > 5
    for name, tensor in one.items():
        assert tensor.equal(two[name]), name  # the same layout: the same arithmetic, bit for bit

    distill = ["distill", "--teacher", str(ck), "--student", str(ck), "--data", str(data),
               *DISTILL]  # fmt: skip
    _ok(cli_subprocess(*distill, "--out", str(tiny / "d_one")))
    _finish(_script_nodes([*distill, "--out", str(tiny / "d_two")]))
    one, two = _metrics(tiny / "d_one"), _metrics(tiny / "d_two")
    assert [r["step"] for r in two] == [1, 2] and two[-1]["kl"] > 0
    for ref, got in zip(one, two, strict=True):
        for key in ("loss", "kl", "ce", "grad_norm", "lr"):
            assert got[key] == ref[key], (key, got, ref)
    assert (tiny / "d_two" / "student" / "megatron_prune.json").is_file()
    assert _digest(ck) == before


def test_killing_one_node_stops_the_other(tiny):
    """SIGKILL to node 1's launcher mid-training: its rank dies with it, node 0's rank loses its
    peer and node 0's launcher ends with one line naming the likely cause; nothing is left."""
    ck, out = tiny / "ckpt", tiny / "d_killed"
    before = _digest(ck)
    argv = ["distill", "--teacher", str(ck), "--student", str(ck), "--data",
            str(tiny / "data" / "train"), "--train-tokens", str(128 * 2000), "--seq-len", "32",
            "--global-batch", "4", "--lm-weight", "0.5", "--tp", "2",
            "--out", str(out)]  # fmt: skip
    nodes = _cli_nodes(argv)
    ranks: list[set[int]] = [set(), set()]

    def training() -> bool:
        for node, found in zip(nodes, ranks, strict=True):
            assert node.poll() is None, node.communicate()
            found.update(_children(node.pid))
        metrics = out / "metrics.jsonl"
        return all(ranks) and metrics.is_file() and bool(metrics.read_text().strip())

    _wait_for(training, 300, "both nodes to train")
    ranks[0].update(_children(nodes[0].pid))
    nodes[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    nodes[1].communicate(timeout=30)
    _, stderr = nodes[0].communicate(timeout=120)
    stopped_after = time.monotonic() - killed
    assert nodes[0].returncode != 0, stderr
    assert "another node's ranks may have stopped or failed" in stderr, stderr[-3000:]
    _wait_for(lambda: not any(_alive(p) for p in ranks[0] | ranks[1]), 15, "every rank to exit")
    assert stopped_after < 60, stopped_after  # bounded: not gloo's 30-minute collective timeout
    assert not (out / "student").exists() and _digest(ck) == before
