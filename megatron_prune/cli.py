"""``megatron-prune <command>``: the command line, a thin shell over :mod:`megatron_prune.api`.

Every command accepts ``--nproc-per-node N`` and then re-launches itself with N local ranks
(torch's elastic launcher, what torchrun runs). A command whose layout needs more ranks than it
was started with (``convert --tp 2`` from a plain shell) re-launches itself the same way.
``--nnodes N --node-rank I --master-addr HOST --master-port P`` (torchrun's names) spread the
ranks over N nodes: the same line runs on every node (a static rendezvous at HOST:P, which node 0
serves); node 0 holds the output locks.

Errors: bad input raises :class:`~megatron_prune.errors.UserError`; it is printed as one line
(once, however many ranks refused) and the exit code is 2. Anything else is a bug: it keeps its
traceback, a line says how to report it, and the exit code is 1. ``MEGATRON_PRUNE_DEBUG=1``
shows the traceback of a refusal too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import tempfile
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

from megatron_prune.errors import UserError
from megatron_prune.lifetime import (
    LAUNCHER_PID_ENV,
    children_die_with_this_process,
    die_with_launcher,
)
from megatron_prune.paths import RUN_ID_ENV, output_locks, release_held_locks

COMMANDS = {
    "convert": "Convert GGUF / Hugging Face / Megatron checkpoints, at any TP x PP",
    "eval": "Evaluate a checkpoint (ppl: perplexity on a text file)",
    "generate": "Greedy generation from a prompt",
    "score": "Importance scores from calibration activations, at any layout",
    "plan": "A pruning target from a budget (uniform, AlphaPruning or Tyr per-layer widths)",
    "prune": "Structured pruning (width, depth, CLAP, SLNP, norm absorption)",
    "sparsify": "Unstructured magnitude / Wanda masks, uniform or AlphaPruning ratios",
    "data": "Build Megatron indexed datasets (data build) with a checkpoint's tokenizer",
    "distill": "Online full-vocabulary logit distillation (teacher and student, one layout)",
    "bench": "Prefill, decode and training-step tokens/s, TFLOP/s and MFU; dense vs pruned",
    "report": "A markdown report with plots from finished run folders",
    "run": "Run a YAML recipe (a list of the commands above)",
}

EXIT_USER_ERROR = 2
EXIT_BUG = 1
EXIT_SIGNAL = 128  # + the signal number, as a shell reports a process a signal ended
# The flags naming what a command writes (locked while it runs), unless its module has outputs().
OUTPUT_FLAGS = ("dst", "out", "output")
# Where ranks started by this launcher leave the text of a refusal for the launcher to print.
ERROR_DIR_ENV = "MEGATRON_PRUNE_ERROR_DIR"
DEBUG_ENV = "MEGATRON_PRUNE_DEBUG"
BUG_REPORT = (
    "this is a bug in megatron-prune, not a problem with your input: please report it with the "
    "command line and the traceback above"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"megatron_prune.commands.{name}")
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument(
            "--nproc-per-node",
            type=int,
            default=None,
            help="re-launch with this many processes on this node",
        )
        _add_node_arguments(cmd)
        module.add_arguments(cmd)
        cmd.set_defaults(module=module)
    return parser


def _add_node_arguments(cmd: argparse.ArgumentParser) -> None:
    nodes = cmd.add_argument_group("multi-node launch (torchrun's names; one line per node)")
    nodes.add_argument("--nnodes", type=int, default=1, help="nodes taking part (default 1)")
    nodes.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    nodes.add_argument("--master-addr", default="127.0.0.1",
                       help="address of node 0, which serves the rendezvous")  # fmt: skip
    nodes.add_argument("--master-port", type=int, default=29500, help="its free TCP port")


def _check_nodes(args: argparse.Namespace) -> None:
    if args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--nnodes {args.nnodes} --node-rank {args.node_rank}: the node rank "
                        "must be 0 .. nnodes-1, a different one on each node")  # fmt: skip
    if not 0 < args.master_port < 65536:
        raise UserError(f"--master-port {args.master_port} is not a TCP port (1-65535)")


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def _in_launched_rank() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def relaunch(nproc: int, argv: list[str], command: str,
             nodes: argparse.Namespace | None = None) -> int:  # fmt: skip
    """Run this command again on ``nproc`` local ranks (of ``nodes.nnodes`` nodes, when given:
    a static rendezvous, as torchrun's); print a refusal once for all of this node's ranks."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nnodes = nodes.nnodes if nodes is not None else 1
    rendezvous = (
        {"rdzv_backend": "static", "rdzv_endpoint": f"{nodes.master_addr}:{nodes.master_port}",
         "rdzv_configs": {"rank": nodes.node_rank}}
        if nnodes > 1 else {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0"}
    )  # fmt: skip
    config = LaunchConfig(
        min_nodes=nnodes,
        max_nodes=nnodes,
        nproc_per_node=nproc,
        run_id=os.environ[RUN_ID_ENV],
        max_restarts=0,
        monitor_interval=0.1,
        **rendezvous,
    )
    # The agent logs every failed rank at ERROR level (and a stop signal as a warning); our
    # ranks report for themselves. torch sets a level on each of its loggers: quiet them all.
    for name in ["torch.distributed.elastic", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="megatron-prune-errors-") as error_dir:
        os.environ[ERROR_DIR_ENV] = error_dir
        os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # ranks die with this process
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        try:
            elastic_launch(config, sys.executable)("-m", "megatron_prune.cli", *_strip_nproc(argv))
        except SignalException as err:  # the agent has stopped every rank before re-raising
            return _stopped(command, err.sigval)
        except ChildFailedError as err:
            refusals = sorted({p.read_text() for p in Path(error_dir).glob("rank*.txt")})
            if refusals:
                for line in refusals:  # ranks that refused the same thing print one line
                    print(f"megatron-prune {command}: error: {line}", file=sys.stderr)
                return EXIT_USER_ERROR
            codes = sorted({f.exitcode for f in err.failures.values()})
            why = BUG_REPORT
            if nnodes > 1:  # a rank loses its peers when another node stops or fails
                why = ("another node's ranks may have stopped or failed (see that node's "
                       f"output); if none did, {BUG_REPORT}")  # fmt: skip
            print(f"megatron-prune {command}: ranks failed (exit codes {codes}); {why}",
                  file=sys.stderr)  # fmt: skip
            return EXIT_BUG
        finally:
            os.environ.pop(ERROR_DIR_ENV, None)
            os.environ.pop(LAUNCHER_PID_ENV, None)
    return 0


@contextlib.contextmanager
def _stop_on_signals(command: str) -> Iterator[None]:
    """SIGTERM / SIGHUP to a command running in this process: release its output locks, say so
    in one line and exit at once (128 + the signal). An exception raised from a signal handler
    is not reliable (Python swallows it inside at-fork callbacks, finalizers...: a run carried on
    to the end that way); what is left is at most OUT.partial, as after SIGKILL. Forked helpers
    die with this process. Main thread only (Python's rule); the old handlers come back after,
    for callers of :func:`main` in their process."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame) -> None:
        release_held_locks()
        code = _stopped(command, signum)
        sys.stderr.flush()
        os._exit(code)

    children_die_with_this_process()
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _stopped(command: str, sig: int) -> int:
    name = signal.Signals(sig).name
    print(f"megatron-prune {command}: stopped by {name}; every rank has stopped. Outputs are "
          "untouched: an unfinished one is only OUT.partial, which the next run cleans up "
          "(score and distill: or continues with --resume)", file=sys.stderr)  # fmt: skip
    return EXIT_SIGNAL + int(sig)


def _outputs(args: argparse.Namespace) -> list[Path]:
    """What this command writes: its module's ``outputs(args)``, else its output flags."""
    outputs = getattr(args.module, "outputs", None)
    if outputs is not None:
        return [Path(p) for p in outputs(args)]
    return [Path(v) for flag in OUTPUT_FLAGS if isinstance(v := getattr(args, flag, None), str)]


def _refuse(command: str, err: UserError) -> int:
    """One line for a refusal: from the launcher, or from rank 0 when run under torchrun."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and _in_launched_rank():
        Path(error_dir, f"rank{_rank()}.txt").write_text(str(err))
    elif _rank() == 0:
        print(f"megatron-prune {command}: error: {err}", file=sys.stderr)
    return EXIT_USER_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if _in_launched_rank():
            die_with_launcher()
            if ERROR_DIR_ENV in os.environ or _rank() != 0:
                args.module.run(args)  # our launcher (or rank 0) holds the output locks
                return 0
        else:
            # Bad input is reported here, once, before any process is spawned.
            _check_nodes(args)
            # New per command (recipe steps too); the nodes of one run share theirs.
            os.environ[RUN_ID_ENV] = (f"nodes-{args.master_addr}:{args.master_port}"
                                      if args.nnodes > 1 else str(uuid.uuid4()))  # fmt: skip
            getattr(args.module, "validate", lambda a: None)(args)
            needed = getattr(args.module, "world_size_needed", lambda a: 1)(args)
            nproc = args.nproc_per_node or (needed if needed > 1 else None)
            if args.nnodes > 1 and args.nproc_per_node is None:
                nproc = max(1, needed // args.nnodes)
            world = nproc * args.nnodes if nproc is not None else None
            if world is not None and (nproc < 1 or world % needed):
                nodes = f" x --nnodes {args.nnodes}" if args.nnodes > 1 else ""
                raise UserError(f"--nproc-per-node {nproc}{nodes}: the layout needs a multiple "
                                f"of {needed} ranks (tp x pp); launch {needed}, "
                                f"{2 * needed}, ...")  # fmt: skip
            if nproc:
                # Node 0 holds the locks; the other nodes' ranks share its run id.
                with output_locks(_outputs(args) if args.node_rank == 0 else []):
                    nodes = args if args.nnodes > 1 else None
                    return relaunch(nproc, argv, args.command, nodes)
        stop = contextlib.nullcontext() if _in_launched_rank() else _stop_on_signals(args.command)
        with stop, output_locks(_outputs(args)):
            args.module.run(args)
    except KeyboardInterrupt:
        return _stopped(args.command, signal.SIGINT)
    except UserError as err:
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        return _refuse(args.command, err)
    except Exception:
        traceback.print_exc()
        print(f"megatron-prune {args.command}: {BUG_REPORT}", file=sys.stderr)
        return EXIT_BUG
    finally:
        _shutdown()
    return 0


def _shutdown() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from megatron_prune.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
