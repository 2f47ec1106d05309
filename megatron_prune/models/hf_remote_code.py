"""The transformers model class ``convert --to hf`` writes next to the weights (as
``modeling_megatron_prune.py``, loaded with ``trust_remote_code=True``) when the stock class
cannot express the model: pruned models whose layers differ in width, and sandwich models whose
post-norms were absorbed into the output projections.

It subclasses the stock class named by ``BASE_CLASS`` (the exporter writes the family's) and
rebuilds only what differs, as config.json's ``"megatron_prune"`` entry says:
``"layer_widths"``, one dict of config overrides per layer (``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``): that decoder layer is built from a copy of
the config with those values; ``"identity_modules"``, decoder-layer modules (post-norms) that
become identities. Everything else, forward included, is the stock class's.

This file must stay self-contained: it runs where only torch and transformers are installed.
"""

import copy

import torch
import transformers

BASE_CLASS = "LlamaForCausalLM"


class MegatronPruneForCausalLM(getattr(transformers, BASE_CLASS)):
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
