"""The transformers classes ``convert --to hf`` writes next to the weights (as
``modeling_megatron_prune.py``, loaded with ``trust_remote_code=True``) when the stock classes
cannot express the model: pruned models whose layers differ in width, sandwich models whose
post-norms were absorbed into the output projections, and models whose hidden size is not a
multiple of their head count (width pruning chooses the hidden size freely: ``make demo``'s
SmolLM2 keeps 512 channels and 9 heads of 64).

``MegatronPruneForCausalLM`` subclasses the stock model class named by ``BASE_CLASS`` (the
exporter writes the family's) and rebuilds only what differs, as config.json's
``"megatron_prune"`` entry says: ``"layer_widths"``, one dict of config overrides per layer
(``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``): that decoder layer is
built from a copy of the config with those values; ``"identity_modules"``, decoder-layer
modules (post-norms) that become identities. Everything else, forward included, is the stock
class's.

``MegatronPruneConfig`` subclasses the stock model's config class. The stock Llama and Gemma 3
configs refuse ``hidden_size % num_attention_heads != 0`` even with an explicit ``head_dim``,
although their attention only ever uses ``num_attention_heads * head_dim``; ours checks what
the model really needs instead. Having a class of our own also keeps transformers from mapping
the stock config class to our model class for the rest of the process (it registers the
loaded config's class).

This file must stay self-contained: it runs where only torch and transformers (with its own
dependency huggingface_hub) are installed.
"""

import copy

import torch
import transformers
from huggingface_hub.dataclasses import strict

BASE_CLASS = "LlamaForCausalLM"
_BASE = getattr(transformers, BASE_CLASS)


@strict
class MegatronPruneConfig(_BASE.config_class):
    def validate_architecture(self):
        """The stock check without ``hidden_size % num_attention_heads == 0``: with an explicit
        ``head_dim`` the projections are ``hidden_size x num_attention_heads * head_dim``."""
        if not self.head_dim:
            raise ValueError("head_dim must be set explicitly")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


class MegatronPruneForCausalLM(_BASE):
    config_class = MegatronPruneConfig

    def __init__(self, config):
        super().__init__(config)
        spec = getattr(config, "megatron_prune", None) or {}
        layers = self.model.layers
        for i, overrides in enumerate(spec.get("layer_widths") or []):
            layer_config = copy.copy(config)
            for key, value in overrides.items():
                setattr(layer_config, key, value)
            layers[i] = type(layers[i])(layer_config, i)
        for name in spec.get("identity_modules") or []:
            for layer in layers:
                setattr(layer, name, torch.nn.Identity())
        self.post_init()
