"""Build a Megatron-Core GPTModel (one per virtual-pipeline chunk) from a :class:`ModelArch`.

Only numbers are chosen here; the modules come from :mod:`megatron_prune.models.spec`.
Parallelism is whatever Megatron's parallel state says when this runs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_prune import compat
from megatron_prune.models.arch import ModelArch
from megatron_prune.models.norm import RMSNorm
from megatron_prune.models.spec import layer_spec

_ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


@dataclass
class PerLayerTransformerConfig(TransformerConfig):
    """The TransformerConfig of a heterogeneous model: one FFN size, head count and query-group
    count per layer.

    Megatron's TransformerBlock builds each layer from ``get_config_for_layer`` when
    ``heterogeneous_block_specs`` is set, and then keys every layer separately in dist
    checkpoints (uniform models stack them), so saving, loading and resharding need nothing
    else. megatron-core's own HeterogeneousTransformerConfig reads a Nemotron-NAS JSON file and
    cannot vary the head count, which width pruning does.
    """

    layer_widths: tuple[tuple[int, int, int], ...] = ()  # (ffn, heads, groups), one per layer

    def __post_init__(self) -> None:
        super().__post_init__()
        self.heterogeneous_block_specs = True
        self._layer_configs: dict[int, TransformerConfig] = {}

    def get_config_for_layer(self, layer_number: int) -> TransformerConfig:
        """A plain TransformerConfig for 1-based ``layer_number`` (what megatron-core calls)."""
        if layer_number not in self._layer_configs:
            ffn, heads, groups = self.layer_widths[layer_number - 1]
            base = compat.config_values(self, TransformerConfig)
            base.update(
                ffn_hidden_size=ffn, num_attention_heads=heads, num_query_groups=groups,
                heterogeneous_block_specs=False,
            )  # fmt: skip
            self._layer_configs[layer_number] = compat.make_config(TransformerConfig, **base)
        return self._layer_configs[layer_number]


def batched_p2p_supported() -> bool:
    """Whether pipeline stages may use batched point-to-point (``batch_isend_irecv``): not on
    gloo (the CPU path), where batched p2p gave wrong numbers with interleaved pipelines; yes on
    NCCL and HCCL, where it is Megatron's default. Without a pipeline group (or torch.distributed)
    there is no p2p to batch and the answer is Megatron's default."""
    if not torch.distributed.is_initialized():
        return True
    group = compat.pipeline_group_or_none()
    if group is None:
        return True
    return torch.distributed.get_backend(group) != "gloo"


def transformer_config(
    arch: ModelArch,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    cpu_initialization: bool = True,
    initialize: bool = True,
    recompute_granularity: str | None = None,
) -> TransformerConfig:
    """The TransformerConfig for ``arch`` at the current parallel state.

    Fusions that need CUDA kernels are off. ``cpu_initialization`` only says where parameters
    are created (then moved to the device); it does not decide how pipeline stages talk: that
    follows the pipeline group's backend (:func:`batched_p2p_supported`), so GPU and NPU runs
    keep Megatron's batched p2p even when their parameters are created on the CPU.
    ``recompute_granularity`` is Megatron's: ``selective`` recomputes core attention in the
    backward pass, ``full`` whole layers (one at a time).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    arch.check_layout(tp, pp, vpp)
    window = None
    if arch.sliding_window is not None:
        window = (arch.sliding_window - 1, 0)  # (left, right) tokens besides the query itself
    per_layer = {}
    if arch.heterogeneous:
        per_layer["layer_widths"] = tuple(tuple(w) for w in arch.all_widths())
    config_class = PerLayerTransformerConfig if per_layer else TransformerConfig
    return compat.make_config(
        config_class,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        layernorm_epsilon=arch.norm_eps,
        layernorm_zero_centered_gamma=arch.zero_centered_gamma,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        gated_linear_unit=True,
        activation_func=_ACTIVATIONS[arch.activation],
        softmax_scale=arch.softmax_scale,
        window_size=window,
        window_attn_skip_freq=(
            [int(x) for x in arch.local_layers] if arch.local_layers else arch.global_every
        ),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu_initialization,
        perform_initialization=initialize,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
        batch_p2p_comm=batched_p2p_supported(),
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        **per_layer,
    )


def _embedding_scaler(scale: float):
    def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        return output * torch.tensor(scale, dtype=output.dtype)

    return hook


def build_chunk(
    arch: ModelArch,
    config: TransformerConfig,
    vp_stage: int | None = None,
    attention_backend: str = "auto",
) -> GPTModel:
    """One GPTModel holding this rank's layers of virtual-pipeline chunk ``vp_stage``."""
    with compat.virtual_stage(vp_stage):  # megatron-core 0.12 reads the stage from there
        return _build_chunk(arch, config, vp_stage, attention_backend)


def _build_chunk(
    arch: ModelArch, config: TransformerConfig, vp_stage: int | None, attention_backend: str
) -> GPTModel:
    stage = compat.vp_kwargs(vp_stage)
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, **stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, **stage)
    n_local = get_num_layers_to_build(config, **stage)
    spec = layer_spec(arch, attention_backend=attention_backend)
    block = TransformerBlockSubmodules(layer_specs=[spec] * n_local, layer_norm=RMSNorm)
    model = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,
        **stage,
    )
    compat.mark_vp_stage(model, vp_stage)
    if pre and arch.embedding_scale != 1.0:
        # Gemma multiplies token embeddings by sqrt(h); GPTModel has no slot for it.
        model.embedding.register_forward_hook(_embedding_scaler(arch.embedding_scale))
    return model


def build_model(
    arch: ModelArch,
    *,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | None = None,
    initialize: bool = True,
    attention_backend: str = "auto",
    recompute_granularity: str | None = None,
) -> list[GPTModel]:
    """This rank's model chunks (one unless a virtual pipeline is in use), in eval mode.
    ``initialize=False`` skips random initialisation when weights are loaded right after;
    ``attention_backend`` is ``--attention-backend`` (:mod:`megatron_prune.models.attention`)."""
    config = transformer_config(
        arch,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        cpu_initialization=device is None or device.type == "cpu",
        initialize=initialize,
        recompute_granularity=recompute_granularity,
    )
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    stages = [None] if vpp is None else list(range(vpp))
    chunks = [build_chunk(arch, config, s, attention_backend) for s in stages]
    for chunk in chunks:
        if not initialize:
            tag_tensor_parallel_params(chunk)
        if device is not None:
            chunk.to(device)
        chunk.eval()
    return chunks


def tag_tensor_parallel_params(chunk: torch.nn.Module) -> None:
    """Set the ``tensor_model_parallel`` / ``partition_dim`` tags Megatron gives the parameters
    it initialises; without them (initialisation skipped because weights are loaded next) the
    optimizer's gradient norm counts TP-split weights on TP rank 0 only."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    from megatron_prune.models.partition import partition_dim

    for module in chunk.modules():
        for name, param in module.named_parameters(recurse=False):
            dim = partition_dim(module, name)
            if dim is not None and not hasattr(param, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(param, True, dim, 1)
