"""Steps the torchrun workers share."""

from pathlib import Path

import torch


def convert(src: str, ckpt: Path, layout: dict) -> None:
    """Convert ``src`` to a Megatron checkpoint at ``layout`` (collective)."""
    from megatron_prune.checkpoint.sources import open_source
    from megatron_prune.distributed import ParallelLayout
    from megatron_prune.stages.convert import to_megatron

    to_megatron(open_source(src), ckpt, ParallelLayout(**layout), overwrite=True, device="cpu")


def logits_at(ckpt: Path, layout: dict, tokens: torch.Tensor, attention_backend: str = "auto"):
    """(model, whole logits) of ``ckpt`` loaded at ``layout`` (collective)."""
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.evaluate.forward import full_logits

    lay = ParallelLayout(**layout)
    initialize(lay, "cpu")
    model = load_model(
        ckpt, sequence_parallel=lay.sequence_parallel, attention_backend=attention_backend
    )
    return model, full_logits(model.chunks, tokens, model.arch.vocab_size)
