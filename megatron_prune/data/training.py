"""Training batches from Megatron indexed datasets, read through megatron.core's GPTDataset with
Megatron-LM-style blends (``PREFIX`` or ``W1 PREFIX1 W2 PREFIX2 ...``).

Sample order is a pure function of (seed, step): step k uses global samples
[k*G, (k+1)*G) of the blended dataset, and data-parallel rank r takes the r-th contiguous slice
of them. Resuming at step k therefore needs nothing but k, and the global batch is the same
whatever the number of DP ranks or micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_prune.data.indexed import DataError


@dataclass(frozen=True)
class TokenizerView:
    """The few tokenizer attributes GPTDataset reads (it never tokenizes)."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # part of GPTDataset's cache key
        return {"class": "megatron_prune.TokenizerView", "vocab_size": self.vocab_size,
                "eod": self.eod}  # fmt: skip


def parse_blend(items: list[str]) -> tuple[list[str], list[float] | None]:
    """``[PREFIX]`` or ``[W1, PREFIX1, W2, PREFIX2, ...]`` -> (prefixes, weights or None)."""
    if len(items) == 1:
        prefixes, weights = items, None
    elif len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
        except ValueError:
            raise DataError(
                f"--data {' '.join(items)}: give one PREFIX, or weight/prefix pairs "
                "(e.g. --data 0.7 books 0.3 web)"
            ) from None
        prefixes = items[1::2]
    else:
        raise DataError(f"--data {' '.join(items)}: weights and prefixes must come in pairs")
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not Path(prefix + ext).is_file()]
        if missing:
            raise DataError(
                f"dataset {prefix}{missing[0]} not found: build it with "
                f"`megatron-prune data build --tokenizer CKPT --input FILE --output {prefix}`"
            )
    return prefixes, weights


def build_train_dataset(
    blend: tuple[list[str], list[float] | None],
    *,
    samples: int,
    seq_len: int,
    tokenizer: TokenizerView,
    seed: int,
    cache_dir: Path,
):
    """The blended training dataset with at least ``samples`` sequences of ``seq_len`` tokens.
    Collective when torch.distributed is initialised (rank 0 builds the index caches first)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        blend=blend,
        split="100,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [samples, 0, 0], lambda: True, config
    ).build()
    return train


class GlobalBatches:
    """This DP rank's micro-batches of each global step."""

    def __init__(
        self, dataset, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int
    ) -> None:
        if global_batch % (micro_batch * dp_size):
            raise DataError(
                f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x "
                f"data-parallel size {dp_size}; try --global-batch "
                f"{max(1, round(global_batch / (micro_batch * dp_size))) * micro_batch * dp_size}"
            )
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank

    @property
    def micro_batches_per_step(self) -> int:
        return self.per_rank // self.micro_batch

    def step(self, step: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        """Micro-batches {tokens, labels, loss_mask, position_ids} ([m, s] each) of ``step``."""
        first = step * self.global_batch + self.dp_rank * self.per_rank
        samples = [self.dataset[i] for i in range(first, first + self.per_rank)]
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        out = []
        for start in range(0, self.per_rank, self.micro_batch):
            group = samples[start : start + self.micro_batch]
            out.append({k: torch.stack([s[k] for s in group]).to(device) for k in keys})
        return out
