"""What ``bench`` times and how often, apart from the timing code (which needs megatron-core),
so the command line builds its options without importing it."""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("prefill", "decode", "train")


@dataclass(frozen=True)
class BenchOptions:
    """What to time and how often."""

    batch_size: int = 1
    seq_len: int = 2048
    micro_batch_size: int | None = None  # default: batch_size at PP=1, 1 with a pipeline
    warmup: int = 2
    iters: int = 5
    decode_tokens: int = 32
    phases: tuple[str, ...] = PHASES
    layer_timings: bool = True

    def micro_batch(self) -> int:
        from megatron.core import parallel_state

        if self.micro_batch_size is not None:
            return self.micro_batch_size
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        return self.batch_size if pp == 1 else 1
