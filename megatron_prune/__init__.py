"""megatron_prune: structured pruning with weight re-initialisation and online distillation for
Megatron-Core models (the Pangu Light recipe), with budgeted allocation (``plan``: uniform or
AlphaPruning per-layer widths; Tyr-the-Pruner's search is planned, not built)."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core warns at import time, once per module, that it falls back to plain-torch kernels
# when Transformer Engine / Apex are absent. That is this project's normal CPU and NPU path.
_warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")
# torch.distributed.checkpoint deprecates ShardedTensor, which megatron-core 0.16 still uses.
_warnings.filterwarnings("ignore", message=r"Please use DTensor instead", category=FutureWarning)
# megatron-core 0.16 calls torch DCP's deprecated load_state_dict and warns about its own
# TransformerConfig defaults; neither is actionable by our users.
_warnings.filterwarnings(
    "ignore", message=r"`load_state_dict` is deprecated", category=FutureWarning
)
_warnings.filterwarnings("ignore", message=r"full scope is deprecated")
_warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")
_warnings.filterwarnings(
    "ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated"
)
