"""The distillation loss's settings, apart from the loss (which needs megatron-core), so the
commands check them before importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_prune.errors import UserError


@dataclass(frozen=True)
class DistillLossConfig:
    temperature: float = 1.0
    reverse: bool = False  # KL(student || teacher) instead of KL(teacher || student)
    scale_by_t2: bool = True  # keeps gradient magnitudes comparable across temperatures
    top_k: int | None = None  # teacher restricted to its k most likely tokens
    lm_weight: float = 0.0  # share of the LM cross-entropy in the loss; 1.0 = no distillation
    chunk_tokens: int = 1024  # tokens per fp32 chunk of the loss (bounds its extra memory)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lm_weight <= 1.0:
            raise UserError(f"lm_weight must lie in [0, 1], got {self.lm_weight}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and (self.reverse or self.top_k < 1):
            raise UserError("top-k distillation needs forward KL and k >= 1")

    def to_dict(self) -> dict:
        return asdict(self)
