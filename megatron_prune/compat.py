"""Which megatron-core versions this tool runs on, and every difference between them.

Supported: megatron-core 0.12.0 through 0.16.x (the cp311 wheels PyPI has; Ascend's
MindSpeed-LLM pins Megatron-LM's core_r0.12.0, the project pins 0.16.1). The rest of the code
never asks which version is installed: it calls the helpers below, each keyed on the installed
version, each with a comment saying what changed in which release. The CPU shim
(``accelerator.py``) and the optimizer workarounds (``distill/state.py``) were checked against
this range only; on any other version they could misbehave silently, so it is refused before
any work (``MEGATRON_PRUNE_ALLOW_UNTESTED_MEGATRON=1`` skips the check, at the user's risk).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import re
from collections.abc import Iterator
from dataclasses import fields
from types import ModuleType
from typing import Any

from megatron_prune.errors import UserError

OLDEST = (0, 12)  # oldest (major, minor) supported, every patch release of it
NEWEST = (0, 16)  # newest (major, minor) supported, every patch release of it
SUPPORTED_RANGE = "0.12.0 - 0.16.x"
ALLOW_ENV = "MEGATRON_PRUNE_ALLOW_UNTESTED_MEGATRON"


def megatron_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH (Megatron-LM's own tree)
        import megatron.core

        return getattr(megatron.core, "__version__", "unknown")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of ``0.12.3``, ``0.13.0rc2``, ``0.16.1+local``; None if unreadable."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def is_supported(text: str) -> bool:
    parsed = parse_version(text)
    return parsed is not None and OLDEST <= parsed[:2] <= NEWEST


def check_megatron_core() -> None:
    """Refuse a megatron-core outside the supported range."""
    found = megatron_core_version()
    if is_supported(found) or os.environ.get(ALLOW_ENV) == "1":
        return
    raise UserError(
        f"megatron-core {found} is installed, but megatron-prune supports megatron-core "
        f"{SUPPORTED_RANGE} only: pip install 'megatron-core>=0.12,<0.17' "
        f"(or set {ALLOW_ENV}=1 to try anyway)"
    )


@functools.cache
def _installed() -> tuple[int, int]:
    """(major, minor) of the installed megatron-core; an unreadable version counts as newest."""
    parsed = parse_version(megatron_core_version())
    return parsed[:2] if parsed is not None else NEWEST


def since(minor: int) -> bool:
    """True when the installed megatron-core is 0.``minor`` or newer."""
    return _installed() >= (0, minor)


# --- 0.13: virtual-pipeline chunks named by argument ------------------------------------------
# megatron-core 0.13 added ``vp_stage`` to GPTModel, TransformerBlock, get_num_layers_to_build
# and parallel_state.is_pipeline_first/last_stage. In 0.12 all of them read the process-wide
# virtual pipeline rank (parallel_state.set_virtual_pipeline_model_parallel_rank), which
# Megatron-LM sets before building, and before asking the sharded state dict of, each chunk.


def vp_kwargs(vp_stage: int | None) -> dict[str, Any]:
    """``vp_stage=...`` for the calls that take it (0.13+); nothing on 0.12."""
    return {"vp_stage": vp_stage} if since(13) else {}


@contextlib.contextmanager
def virtual_stage(vp_stage: int | None) -> Iterator[None]:
    """On 0.12, make ``vp_stage`` the process-wide virtual pipeline rank while the block runs
    (building a chunk, asking its sharded state dict); the previous rank is restored after.
    A no-op on 0.13+ (the chunk knows its stage) and without a virtual pipeline."""
    if since(13) or vp_stage is None:
        yield
        return
    from megatron.core import parallel_state

    previous = parallel_state.get_virtual_pipeline_model_parallel_rank()
    parallel_state.set_virtual_pipeline_model_parallel_rank(vp_stage)
    try:
        yield
    finally:
        parallel_state.set_virtual_pipeline_model_parallel_rank(previous)


def mark_vp_stage(model: Any, vp_stage: int | None) -> None:
    """Record ``vp_stage`` on a chunk built on 0.12 (0.13's GPTModel stores it itself), so
    code that asks a chunk for its stage (the distillation pair) finds it on every version."""
    if not hasattr(model, "vp_stage"):
        model.vp_stage = vp_stage


def model_layer_number(layer_number: int, config: Any) -> int:
    """The 1-based number in the whole model of the layer whose attention got ``layer_number``.
    0.13+ hands self-attention and core attention the model-wide number; 0.12 hands them the
    number within this pipeline chunk (TransformerLayer kept the model-wide one to itself), so
    add the chunk's offset (read while the chunk is built, see :func:`virtual_stage`)."""
    if since(13):
        return layer_number
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return layer_number + get_transformer_layer_offset(config)


def pipeline_group_or_none() -> Any:
    """This rank's pipeline-parallel group, or None before Megatron's groups exist. 0.13 added
    ``get_pipeline_model_parallel_group(check_initialized=False)``; 0.12's asserts instead."""
    from megatron.core import parallel_state

    if since(13):
        return parallel_state.get_pipeline_model_parallel_group(check_initialized=False)
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_pipeline_model_parallel_group()


# --- 0.13: torch DCP's _write_item takes a serialization format ------------------------------
# Newer torch (2.13 here) added a required ``serialization_format`` argument to the private
# torch.distributed.checkpoint.filesystem._write_item. megatron-core 0.13 passes it when the
# signature has it; 0.12's FileSystemWriterAsync does not, and every save fails in its writer
# process ("missing 1 required positional argument: 'serialization_format'").


def fit_checkpoint_writer() -> None:
    """On 0.12 with such a torch, hand megatron-core's writer a ``_write_item`` that passes
    torch's own default format (what 0.13+ passes). Idempotent; call before saving (the writer
    processes are forked, so they inherit it)."""
    if since(13):
        return
    import inspect

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    original = filesystem_async._write_item
    params = inspect.signature(original).parameters
    if getattr(original, "fitted_by_megatron_prune", False) or "serialization_format" not in params:
        return
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    @functools.wraps(original)
    def write_item(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("serialization_format", SerializationFormat.TORCH_SAVE)
        return original(*args, **kwargs)

    write_item.fitted_by_megatron_prune = True  # type: ignore[attr-defined]
    filesystem_async._write_item = write_item


# --- 0.13: the distributed optimizer without Transformer Engine ------------------------------
# megatron-core 0.12's fallback quantize_param_shard (no Transformer Engine installed) raises
# "Invalid Transformer Engine version for FP8 distributed optimizer" even when there are no FP8
# parameters, and the distributed optimizer calls it on every step; 0.13 returns when the list
# of FP8 parameters is empty, as there is nothing to quantize.


def fit_distributed_optimizer() -> None:
    """On 0.12, let the distributed optimizer's FP8 step pass when there are no FP8 params (what
    0.13+ does); with FP8 params it still raises as before. Idempotent."""
    if since(13):
        return
    from megatron.core.optimizer import distrib_optimizer

    original = distrib_optimizer.quantize_param_shard
    if getattr(original, "fitted_by_megatron_prune", False):
        return

    @functools.wraps(original)
    def quantize_param_shard(model_params: list, *args: Any, **kwargs: Any) -> None:
        if len(model_params) == 0:
            return None
        return original(model_params, *args, **kwargs)

    quantize_param_shard.fitted_by_megatron_prune = True  # type: ignore[attr-defined]
    distrib_optimizer.quantize_param_shard = quantize_param_shard


def fit_release() -> None:
    """Everything the installed release needs patched before this tool builds and trains
    models (nothing on 0.16). Idempotent; ``distributed.initialize`` calls it."""
    fit_checkpoint_writer()
    fit_distributed_optimizer()
    fit_numpy_2()


# --- 0.16: numpy 2 ----------------------------------------------------------------------------
# numpy 2.0 removed np.product. megatron-core 0.12-0.15's dist_checkpointing still calls it on
# flattened ShardedTensors (mapping, validation, exchange_utils): the distributed optimizer's
# "fully_sharded_model_space" state, the only model-space format before 0.15. 0.13-0.15 declare
# numpy<2 for it; 0.12 declares nothing; 0.16 calls np.prod. This project pins numpy 2.
_NUMPY_PRODUCT_USERS = (
    "megatron.core.dist_checkpointing.mapping",
    "megatron.core.dist_checkpointing.validation",
    "megatron.core.dist_checkpointing.exchange_utils",
)


class _NumpyWithProduct(ModuleType):
    """numpy, plus the ``product`` alias of ``prod`` numpy 2 removed; given to the modules above
    only, so the rest of the process keeps plain numpy."""

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str) -> Any:
        import numpy

        return numpy.prod if name == "product" else getattr(numpy, name)


def fit_numpy_2() -> None:
    """On 0.12-0.15 with numpy 2, give their np.product callers numpy's prod. Idempotent."""
    import numpy

    if since(16) or hasattr(numpy, "product"):
        return
    for name in _NUMPY_PRODUCT_USERS:
        module = importlib.import_module(name)
        if not isinstance(module.np, _NumpyWithProduct):
            module.np = _NumpyWithProduct()


# --- 0.13-0.15: the process groups handed to core attention ----------------------------------
# SelfAttention builds its core attention with model_comm_pgs=... in 0.13-0.14 and with
# pg_collection=... from 0.15 (nothing in 0.12): models/attention.py accepts both names.


# --- 0.14: unwrap_model in megatron.core.utils -----------------------------------------------
# megatron-core 0.14 added megatron.core.utils.unwrap_model; before, only Megatron-LM had one
# (megatron.training.utils), which this project cannot assume.


def unwrap_model(model: Any) -> Any:
    """The module inside Megatron's wrappers (DDP, FSDP, Float16Module) of one model chunk."""
    if since(14):
        from megatron.core.utils import unwrap_model as megatrons

        return megatrons(model)
    from megatron.core import distributed
    from megatron.core.transformer.module import Float16Module

    wrappers = tuple(
        cls
        for cls in (
            distributed.DistributedDataParallel,
            getattr(distributed, "TorchFullyShardedDataParallel", None),
            Float16Module,
        )
        if isinstance(cls, type)
    )
    while isinstance(model, wrappers):
        model = model.module
    return model


# --- 0.14-0.16: finalize_model_grads keywords ------------------------------------------------
# The schedules call config.finalize_model_grads_func(model, num_tokens, ...) with the keywords
# of their own release's finalize_model_grads: none in 0.12-0.13, grad_finalize_pgs in 0.14,
# pg_collection in 0.15, pg_collection and force_all_reduce in 0.16. distill/trainer.py's
# wrapper hands on whatever it is given, so no version check is needed there.


# --- 0.15: per-layer sliding-window pattern ---------------------------------------------------
# megatron-core 0.15 added TransformerConfig.window_attn_skip_freq (an int "every n-th layer is
# global" or a per-layer list) and transformer.utils.is_layer_window_attention. Before it every
# layer of a model with window_size was windowed, and the local DotProductAttention refused
# window_size altogether (only Transformer Engine had it); our core attention
# (models/attention.py) applies the window itself, so it only needs the pattern.

_ADDED_CONFIG_FIELDS = {"window_attn_skip_freq": 15}  # TransformerConfig field -> minor added


def make_config(config_class: type, **kwargs: Any) -> Any:
    """``config_class(**kwargs)`` where fields added after the installed release are set as
    plain attributes after construction (this project's modules read them; megatron-core's
    own code of that release does not know them)."""
    known = {f.name for f in fields(config_class)}
    later = {k: kwargs.pop(k) for k in list(kwargs) if k not in known and k in _ADDED_CONFIG_FIELDS}
    config = config_class(**kwargs)
    for name, value in later.items():
        setattr(config, name, value)
    return config


def config_values(config: Any, config_class: type) -> dict[str, Any]:
    """The constructor arguments that rebuild ``config`` as a ``config_class`` (its init fields
    plus any field :func:`make_config` had to set as an attribute)."""
    values = {f.name: getattr(config, f.name) for f in fields(config_class) if f.init}
    for name in _ADDED_CONFIG_FIELDS:
        if name not in values and hasattr(config, name):
            values[name] = getattr(config, name)
    return values


def local_attention_has_window() -> bool:
    """Whether megatron-core's local DotProductAttention (``--attention-backend local``) runs
    sliding-window layers: 0.15+; before, it asserted ``window_size is None``."""
    return since(15)


def is_layer_window_attention(window_size: Any, window_attn_skip_freq: Any, layer: int) -> bool:
    """Whether 1-based ``layer`` uses the sliding window, by megatron-core's rule (0.15+: its own
    function): no window_size, no window; no pattern, every layer; an int n, all but every n-th
    layer; a list, its truthy entries."""
    if since(15):
        from megatron.core.transformer.utils import is_layer_window_attention as megatrons

        return megatrons(window_size, window_attn_skip_freq, layer)
    if not window_size:
        return False
    if window_attn_skip_freq is None:
        return True
    if isinstance(window_attn_skip_freq, int):
        return layer % window_attn_skip_freq != 0
    return bool(window_attn_skip_freq[layer - 1])


# --- 0.13 and 0.15: distributed-optimizer checkpoint format -----------------------------------
# megatron-core 0.13 added the ``metadata`` argument of the optimizers' sharded_state_dict
# (DistributedOptimizer reads its sharding type from metadata["distrib_optim_sharding_type"]; in
# 0.12 it was a ``sharding_type`` argument of the distributed optimizer only). 0.15 added the
# "fully_reshardable" type, and 0.16's dist_checkpointing no longer accepts the flattened
# tensors of "fully_sharded_model_space", the default that 0.12-0.14 save and load correctly.
# Both are in model space (one tensor per parameter), loadable at another parallel layout.


def optimizer_sharding_type() -> str:
    return "fully_reshardable" if since(15) else "fully_sharded_model_space"


def optimizer_sharded_state_dict(optimizer: Any, model_state: dict, is_loading: bool) -> dict:
    """``optimizer.sharded_state_dict`` in model space on every release."""
    if since(13):
        metadata = {"distrib_optim_sharding_type": optimizer_sharding_type()}
        return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading)  # the default
