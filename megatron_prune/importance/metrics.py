"""The names of the score metrics (``score --metrics``), apart from the code that computes them,
so the command line can list them without importing megatron-core."""

from __future__ import annotations

ACTIVATION_METRICS = ("channel", "head", "group", "neuron", "layer", "post_norm", "minitron",
                      "wanda", "flap")  # fmt: skip
ALL_METRICS = (*ACTIVATION_METRICS, "layer_ppl", "esd")
DEFAULT_METRICS = ("channel", "head", "group", "neuron", "layer", "post_norm")
