"""Run a Megatron-LM training script (``pretrain_gpt.py``) on the CPU, under torchrun with gloo.

On a machine with a GPU nothing is patched: the script runs as it would without this runner
(the logits dump below still works).

Megatron-LM's training loop assumes CUDA in more places than megatron-core's model code does.
This runner applies megatron-prune's CPU shim (``megatron_prune.accelerator``) and, for the
training loop alone, the few patches it needs on a machine without a GPU, then runs the script
unchanged as ``__main__``. It exists so that the real ``pretrain()`` can be checked with the
distillation trio here (tools/check_megatron_lm.py); it is not a way to train on CPUs.

What is patched, and why each is harmless on the CPU:
* ``initialize_megatron(allow_no_cuda=True)``: skips the "Megatron requires CUDA" assertion;
* ``torch.cuda.device_count() == 1`` and a no-op ``set_device``: Megatron-LM initializes model
  parallelism and seeds its RNG trackers only when it sees a device;
* dataset helpers and fused kernels are not compiled: the helpers come compiled in the
  megatron-core wheel, and the CUDA kernels do not apply;
* ``device="cuda"`` literals in megatron.training and the rerun state machine go to the CPU;
* CUDA streams are stand-ins (the CPU runs in order);
* ``get_device_arch_version() == 0`` (pre-Blackwell rules, CUDA_DEVICE_MAX_CONNECTIONS=1);
* optimizer construction and steps see CPU float tensors named as CUDA ones (megatron-core's
  type-string checks).

With ``MEGATRON_LM_CPU_DUMP=DIR``, the first micro-batch's input tokens (first pipeline stage)
and the student's whole-vocabulary logits (last stage) are saved there, from tensor- and
data-parallel rank 0, for comparison with megatron-prune's own forward pass.

usage: torchrun --nproc-per-node N tools/megatron_lm_cpu.py MEGATRON_LM/pretrain_gpt.py ARGS...
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from pathlib import Path

import torch

TRAINING_MODULES_WITH_CUDA_LITERALS = (
    "megatron.training.initialize",
    "megatron.training.training",
    "megatron.training.checkpointing",
    "megatron.training.utils",
    "megatron.core.rerun_state_machine",
)


class _CpuStream:
    """A CUDA stream stand-in: the CPU executes in order, so every wait is already satisfied."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def synchronize(self) -> None:
        pass


def patch_training_loop() -> None:
    """Apply megatron-prune's CPU shim plus the training-loop patches listed above."""
    from megatron_prune import accelerator

    accelerator.apply_cpu_shim()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *args, **kwargs: None
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda *args, **kwargs: _CpuStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()

    import megatron.core.datasets.utils as dataset_utils
    import megatron.legacy.fused_kernels as fused_kernels

    dataset_utils.compile_helpers = lambda: None
    fused_kernels.load = lambda args: None

    import megatron.training.arguments as arguments
    import megatron.training.initialize as initialize
    import megatron.training.training as training
    import megatron.training.utils as training_utils

    accelerator.redirect_cuda_literals(TRAINING_MODULES_WITH_CUDA_LITERALS)
    training_utils.get_device_arch_version = lambda: 0
    arguments.get_device_arch_version = lambda: 0

    original_initialize = initialize.initialize_megatron

    def initialize_without_cuda(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original_initialize(*args, **kwargs)

    initialize.initialize_megatron = initialize_without_cuda
    training.initialize_megatron = initialize_without_cuda

    for name in ("setup_model_and_optimizer", "train_step"):  # optimizer build and step
        setattr(training, name, _with_cuda_type_names(getattr(training, name)))


def _with_cuda_type_names(function):
    from megatron_prune import accelerator

    def wrapped(*args, **kwargs):
        with accelerator.cuda_type_names():
            return function(*args, **kwargs)

    return wrapped


def dump_first_micro_batch(folder: Path) -> None:
    """Save the first micro-batch's tokens (first stage) and the student's gathered logits
    (last stage) from TP and DP rank 0, by wrapping the distillation pair's forward."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_prune.distill.pair import DistillationChunk

    original_forward = DistillationChunk.forward
    saved: set[str] = set()

    def forward(self, input_ids, position_ids, attention_mask):
        out = original_forward(self, input_ids, position_ids, attention_mask)
        lead = (parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)  # fmt: skip
        if self.pre_process and "tokens" not in saved:
            saved.add("tokens")
            if lead:
                torch.save(input_ids.cpu(), folder / "tokens.pt")
        if self.post_process and "logits" not in saved:
            saved.add("logits")
            student_logits = gather_from_tensor_model_parallel_region(out[0].detach().float())
            if lead:
                torch.save(student_logits.cpu(), folder / "logits.pt")
        return out

    DistillationChunk.forward = forward


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__.splitlines()[-1])
    script = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(script.parent))  # megatron.training and the script's own modules
    if not torch.cuda.is_available():
        patch_training_loop()
    if os.environ.get("MEGATRON_LM_CPU_DUMP"):
        dump_first_micro_batch(Path(os.environ["MEGATRON_LM_CPU_DUMP"]))
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
