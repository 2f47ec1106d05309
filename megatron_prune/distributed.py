"""Process groups: torch.distributed from the torchrun environment, Megatron parallel state from
Megatron-LM-style flags.

Every subcommand takes the same layout flags (``--tensor-model-parallel-size`` / ``--tp``,
``--pipeline-model-parallel-size`` / ``--pp``, ``--virtual-pipeline-model-parallel-size``,
``--sequence-parallel``); data parallelism is whatever world size is left over.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass

import torch

from megatron_prune.accelerator import Accelerator, prepare
from megatron_prune.errors import UserError


@dataclass(frozen=True)
class ParallelLayout:
    """How a model is split: tensor (tp), pipeline (pp), virtual pipeline (vpp) and sequence
    parallelism. The data-parallel size follows from the world size."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise UserError(f"parallel sizes must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise UserError("--virtual-pipeline-model-parallel-size needs pp >= 2 and vpp >= 1")
        if self.sequence_parallel and self.tp < 2:
            raise UserError("--sequence-parallel needs --tensor-model-parallel-size >= 2")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise UserError(
                f"world size {world_size} is not divisible by tp*pp={self.model_parallel_size}; "
                f"launch a multiple of {self.model_parallel_size} processes"
            )
        return world_size // self.model_parallel_size

    def to_dict(self) -> dict:
        return asdict(self)


def add_layout_args(parser: argparse.ArgumentParser) -> None:
    """The Megatron-LM layout flags, with --tp/--pp as short forms."""
    group = parser.add_argument_group("parallel layout (Megatron-LM flags)")
    group.add_argument("--tensor-model-parallel-size", "--tp", dest="tp", type=int, default=1)
    group.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=1)
    group.add_argument(
        "--virtual-pipeline-model-parallel-size", "--vpp", dest="vpp", type=int, default=None
    )
    group.add_argument("--sequence-parallel", action="store_true")
    group.add_argument(
        "--device", choices=["cuda", "npu", "cpu"], default=None, help="default: detect"
    )


def layout_from_args(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(
        tp=args.tp, pp=args.pp, vpp=args.vpp, sequence_parallel=args.sequence_parallel
    )


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun sets them; (0, 0, 1) in a plain process."""
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return rank, local_rank, world


def model_device(accel: Accelerator) -> torch.device | None:
    """Where this rank's models go: its local accelerator, or None on the CPU (models are built
    there, which is what ``load_model(device=None)`` means)."""
    device = accel.device(world_from_env()[1])
    return None if device.type == "cpu" else device


def init_torch_distributed(accel: Accelerator) -> None:
    """Start the default process group from the torchrun environment (or a world of one)."""
    if torch.distributed.is_initialized():
        return
    rank, local_rank, world = world_from_env()
    store = None
    if "MASTER_PORT" not in os.environ:
        if world > 1:
            raise UserError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch under torchrun")
        # a world of one needs no rendezvous: an in-process store, so no TCP port is picked
        # (a port found free and bound a moment later can be taken by a parallel run)
        store = torch.distributed.HashStore()
    if accel.kind == "cuda":
        torch.cuda.set_device(local_rank)
    elif accel.kind == "npu":
        torch.npu.set_device(local_rank)  # type: ignore[attr-defined]
    torch.distributed.init_process_group(backend=accel.backend, store=store, rank=rank,
                                         world_size=world)  # fmt: skip


def initialize(layout: ParallelLayout, device: str | None = None, seed: int = 1234) -> Accelerator:
    """Bring up torch.distributed and Megatron's parallel state for ``layout``.

    Safe to call again with another layout in the same world: the old model-parallel groups are
    torn down first (tests use this to compare layouts inside one torchrun launch); the same
    layout again keeps the groups it has.
    """
    global _CURRENT_LAYOUT
    from megatron_prune.compat import check_megatron_core, fit_release

    check_megatron_core()
    fit_release()
    accel = prepare(device)
    init_torch_distributed(accel)
    from megatron.core import parallel_state, tensor_parallel

    world = torch.distributed.get_world_size()
    layout.data_parallel_size(world)  # validates divisibility
    groups = (layout.tp, layout.pp, layout.vpp)
    if not (parallel_state.model_parallel_is_initialized() and _CURRENT_LAYOUT == groups):
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
        )
        _CURRENT_LAYOUT = groups
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return accel


_CURRENT_LAYOUT: tuple | None = None


def shutdown() -> None:
    """Tear down Megatron's parallel state and the default process group, so a later
    :func:`initialize` in the same process starts afresh."""
    global _CURRENT_LAYOUT
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    _CURRENT_LAYOUT = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
