"""Which axis of a parameter tensor parallelism splits, from its module's type.

Megatron only tags parameters (``tensor_model_parallel``, ``partition_dim``) when it initialises
them, so a model built to be loaded (``perform_initialization=False``) carries no tags; the
module type says it instead: vocab-parallel embeddings and column-parallel linears split rows
(axis 0), row-parallel linears split the weight's columns (axis 1) and replicate the bias.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


def partition_dim(module: torch.nn.Module, param_name: str) -> int | None:
    """The TP-split axis of ``module``'s own parameter ``param_name`` (None: replicated)."""
    if isinstance(module, (VocabParallelEmbedding, ColumnParallelLinear)):
        return 0
    if isinstance(module, RowParallelLinear) and param_name == "weight":
        return 1
    return None
