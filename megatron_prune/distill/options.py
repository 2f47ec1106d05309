"""A distillation run's settings, apart from the trainer (which needs megatron-core), so the
command checks them before importing it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainOptions:
    train_tokens: int
    seq_len: int = 512
    global_batch: int = 8
    micro_batch: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    teacher_bf16: bool = False
    precision: str = "auto"  # the student's: bf16 | fp16 | fp32 (auto: bf16 on accelerators)
    attention_backend: str = "auto"
    recompute_granularity: str | None = None
    initial_loss_scale: float = 2.0**32  # fp16's dynamic loss scale starts here (Megatron's)
    seed: int = 1234
    log_interval: int = 1
    eval_interval: int = 0  # steps between held-out evaluations (0: only at the end)
    eval_tokens: int = 4096
    save_interval: int = 0  # steps between training checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    tensorboard: bool = False
    wandb_project: str | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.train_tokens / self.tokens_per_step))
