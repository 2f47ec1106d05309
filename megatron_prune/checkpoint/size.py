"""How many bytes a command's output will take, estimated from the architecture alone, so that
too little free space is refused before any work (``paths.check_free_space``)."""

from __future__ import annotations

from megatron_prune.models.arch import ModelArch

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2}


def checkpoint_bytes(arch: ModelArch, dtype: str = "fp32") -> int:
    """A model checkpoint: every stored parameter in ``dtype`` (the dist checkpoint's index and
    megatron_prune.json are small beside it)."""
    from megatron_prune.plan.cost import model_params

    return model_params(arch) * BYTES_PER_VALUE[dtype]


def training_run_bytes(arch: ModelArch, precision: str, keep_checkpoints: int) -> int:
    """A distillation run folder: the final student in ``precision`` plus the training
    checkpoints kept at once (each the student, Adam's two fp32 moments and, under mixed
    precision, fp32 main parameters), plus one more being written before the oldest goes."""
    params = checkpoint_bytes(arch, "fp32") // 4
    model = params * BYTES_PER_VALUE[precision]
    optimizer = params * (8 if precision == "fp32" else 12)
    return model + (keep_checkpoints + 1) * (model + optimizer)
