"""Layer specs: megatron-core's local modules, arranged as a pre-norm or a sandwich-norm block.

One function serves every family; the differences (QK-norm, post-norms, local RoPE) are data in
:class:`~megatron_prune.models.arch.ModelArch`, never branches on a family's name.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)

from megatron_prune import compat
from megatron_prune.errors import UserError
from megatron_prune.models.arch import ModelArch
from megatron_prune.models.attention import core_attention_module
from megatron_prune.models.layers import LocalRopeSelfAttention, PostNormRowParallelLinear
from megatron_prune.models.norm import QKNorm, RMSNorm

# The checkpoint keys of the pre-attention / pre-MLP norms, as megatron-core's local and
# Transformer Engine specs store them (there the norms are fused into the next linear layer):
# every standard Megatron-LM GPT model then reads our checkpoints and we read theirs.
NORM_CHECKPOINT_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def layer_spec(
    arch: ModelArch, post_norms: bool | None = None, attention_backend: str = "auto"
) -> ModuleSpec:
    """The TransformerLayer spec for ``arch``.

    Pre-norm block:      x + Attn(N1(x));            x + MLP(N2(x))
    Sandwich block:      x + N3(Attn(N1(x)));        x + N4(MLP(N2(x)))
    where N3/N4 live inside the output projections (:class:`PostNormRowParallelLinear`).
    ``post_norms`` overrides ``arch.post_norms`` (e.g. to build the absorbed or norm-free variant).
    ``attention_backend`` picks the core attention (:func:`~megatron_prune.models.attention.
    core_attention_module`); it changes no parameter, so checkpoints do not depend on it.
    """
    windowed = arch.sliding_window is not None
    if attention_backend == "local" and windowed and not compat.local_attention_has_window():
        raise UserError(
            f"--attention-backend local: megatron-core {compat.megatron_core_version()}'s local "
            "attention has no sliding window (0.15 added it): use --attention-backend auto"
        )
    sandwich = arch.post_norms if post_norms is None else post_norms
    projection = PostNormRowParallelLinear if sandwich else RowParallelLinear
    qk_norm = QKNorm if arch.qk_norm else IdentityOp
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=ModuleSpec(
                module=LocalRopeSelfAttention,
                params={
                    "attn_mask_type": AttnMaskType.causal,
                    "local_rope_theta": arch.local_rope_theta,
                },
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention_module(attention_backend),
                    linear_proj=projection,
                    q_layernorm=qk_norm,
                    k_layernorm=qk_norm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=projection),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=dict(NORM_CHECKPOINT_KEYS),
        ),
    )
