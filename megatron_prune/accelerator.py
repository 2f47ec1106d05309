"""Which accelerator this process runs on, and the CPU shim that lets megatron-core run there.

megatron-core assumes CUDA in a handful of places (RNG trackers, ``torch.cuda.current_device()``
as a device, ``device="cuda"`` literals in schedules, optimizers and masks). On a machine without
an accelerator, or on a GPU machine told to use the CPU, we redirect exactly those places to the
CPU so that the *same* model code runs under ``torchrun`` with the gloo backend; that is how every
multi-rank test of this project runs.

On Ascend NPUs ``torch_npu`` (and its ``transfer_to_npu`` bridge) plays the same role, as in
MindSpeed; on CUDA nothing is patched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from megatron_prune.errors import UserError


@dataclass(frozen=True)
class Accelerator:
    """The device kind a process computes on and the collective backend that goes with it."""

    kind: str  # "cuda" | "npu" | "cpu"
    backend: str  # "nccl" | "hccl" | "gloo"

    def device(self, local_rank: int = 0) -> torch.device:
        """The torch device of this process (one accelerator per local rank)."""
        if self.kind == "cpu":
            return torch.device("cpu")
        return torch.device(self.kind, local_rank)


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    return bool(torch.npu.is_available())  # type: ignore[attr-defined]


def detect(requested: str | None = None) -> Accelerator:
    """Pick the accelerator: ``requested`` ("cuda", "npu", "cpu") or the best one present.

    ``MEGATRON_PRUNE_DEVICE`` overrides detection, which lets a GPU machine run the CPU path
    (see :func:`apply_cpu_shim`).
    """
    choice = requested or os.environ.get("MEGATRON_PRUNE_DEVICE")
    if choice is None:
        if torch.cuda.is_available():
            choice = "cuda"
        elif _npu_available():
            choice = "npu"
        else:
            choice = "cpu"
    backends = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}
    if choice not in backends:
        raise UserError(f"unknown device {choice!r}: choose one of {sorted(backends)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but torch sees no CUDA device")
    if choice == "npu" and not _npu_available():
        raise UserError("device 'npu' requested but torch_npu is missing or sees no NPU")
    return Accelerator(kind=choice, backend=backends[choice])


# Megatron modules with `device="cuda"` literals on the paths this project uses
# (masks, pipeline schedules, optimizers, gradient clipping).
_MODULES_WITH_CUDA_LITERALS = (
    "megatron.core.transformer.utils",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.utils",  # local multi-tensor L2 norm (gradient clipping)
)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare index means "cuda:index" to torch


class _CpuTorch(ModuleType):
    """A stand-in for the ``torch`` module inside one megatron module: identical, except that
    any call given ``device=cuda`` gets ``device=cpu`` instead. Scoped to the listed modules, so
    the rest of the process keeps plain torch and pays nothing."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if not callable(attr) or isinstance(attr, type) or isinstance(attr, ModuleType):
            return attr

        @functools.wraps(attr)
        def redirected(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda_device(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        setattr(self, name, redirected)  # later lookups skip __getattr__
        return redirected


_SHIM_APPLIED = False
# (owner, attribute, original value) of every patch, in the order applied, so the shim can be
# taken off again (remove_cpu_shim).
_ORIGINALS: list[tuple[Any, str, Any]] = []


def _patch(owner: Any, name: str, value: Any) -> None:
    _ORIGINALS.append((owner, name, getattr(owner, name)))
    setattr(owner, name, value)


def shim_applied() -> bool:
    """True while :func:`apply_cpu_shim` has patched this process."""
    return _SHIM_APPLIED


def apply_cpu_shim() -> None:
    """Make megatron-core's CUDA assumptions hold on the CPU. Idempotent.

    Works on a machine with CUDA too, when the CPU path was asked for (``--device cpu``,
    ``MEGATRON_PRUNE_DEVICE=cpu``): megatron's CUDA calls are redirected as on a CPU machine,
    and ``torch.cuda.is_available()`` / ``device_count()`` then report no GPU, so megatron-core
    and this project take their CPU branches instead of mixing CPU tensors with CUDA ones.
    Every rank still runs on the CPU; no tensor is placed on a GPU.

    Also divides the cores among the node's ranks (two threads per rank on a 2-core machine with
    two ranks made a step 40x slower) and disables dynamo, whose first compile costs seconds and
    buys nothing on the CPU.
    """
    global _SHIM_APPLIED
    if _SHIM_APPLIED:
        return
    if torch.cuda.is_available():
        _patch(torch.cuda, "is_available", lambda: False)
        _patch(torch.cuda, "device_count", lambda: 0)

    _patch(torch.cuda, "current_device", lambda: "cpu")  # used as a device argument by megatron
    _patch(torch.cuda, "manual_seed", torch.manual_seed)
    _patch(torch.cuda, "synchronize", lambda *a, **k: None)
    _patch(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    _patch(torch.Tensor, "cuda", lambda self, *a, **k: self)

    import megatron.core.tensor_parallel.random as tp_random

    _patch(tp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    _patch(tp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())

    redirect_cuda_literals(_MODULES_WITH_CUDA_LITERALS)

    if os.environ.get("MEGATRON_PRUNE_KEEP_THREADS") != "1":
        # One process per core: more threads than cores per node oversubscribes badly.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch._dynamo as dynamo

    _patch(dynamo.config, "disable", True)
    _SHIM_APPLIED = True


def redirect_cuda_literals(module_names: Iterable[str]) -> None:
    """Inside each named module, calls given ``device="cuda"`` (or a bare index) get the CPU.

    Part of :func:`apply_cpu_shim` for megatron-core's modules; also for code outside this
    project that has such literals on its CPU path (tools/megatron_lm_cpu.py runs Megatron-LM's
    own training loop this way). Undone by :func:`remove_cpu_shim`."""
    cpu_torch = _CpuTorch()
    for name in module_names:
        _patch(importlib.import_module(name), "torch", cpu_torch)


def remove_cpu_shim() -> None:
    """Undo :func:`apply_cpu_shim`: every patched function, module attribute and setting gets
    its original back (the thread count and ``TORCHDYNAMO_DISABLE`` stay as set). A no-op when
    the shim is not applied. For code that ran the CPU path and must hand the process back as
    it found it, and for the tests that check what the shim changes."""
    global _SHIM_APPLIED
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)
    _SHIM_APPLIED = False


_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def cuda_type_names() -> Iterator[None]:
    """While active (and only with the CPU shim applied), ``Tensor.type()`` with no argument names
    CPU float tensors as CUDA ones. megatron-core's optimizers and gradient clipping check
    parameters by these strings; wrap their construction and ``step()`` in this. A no-op on
    accelerators, and scoped because other code may rely on the true names."""
    if not _SHIM_APPLIED:
        yield
        return
    original = torch.Tensor.type

    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        if args or kwargs:
            return result
        return _CPU_TO_CUDA_TYPE.get(result, result)

    torch.Tensor.type = type_  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type = original  # type: ignore[method-assign]


def prepare(requested: str | None = None) -> Accelerator:
    """Detect the accelerator and make megatron-core usable on it (call once, before building
    models). On NPU, torch_npu's CUDA-to-NPU bridge is loaded as MindSpeed does."""
    accel = detect(requested)
    if accel.kind == "cpu":
        apply_cpu_shim()
    elif accel.kind == "npu":
        importlib.import_module("torch_npu.contrib.transfer_to_npu")
    return accel
