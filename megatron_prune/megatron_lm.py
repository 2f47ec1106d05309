"""Online distillation inside an existing Megatron-LM pretraining script: a model provider, a
``forward_step`` and a loss function that plug into ``megatron.training.pretrain``.

In ``pretrain_gpt.py`` (see docs/megatron_lm.md)::

    from megatron_prune import megatron_lm as kd

    pretrain(train_valid_test_datasets_provider,
             kd.distillation_model_provider(model_provider),   # your student provider
             ModelType.encoder_or_decoder,
             kd.forward_step,
             extra_args_provider=kd.add_distillation_args)

and launch with ``--kd-teacher CKPT`` (a megatron-prune checkpoint of the teacher) next to the
usual flags; the student loads from ``--load`` / ``--pretrained-checkpoint`` as before. Each
pipeline chunk Megatron-LM builds becomes a :class:`~megatron_prune.distill.pair.
DistillationChunk` (student + frozen teacher of the same stage), so DDP, the distributed
optimizer and the 1F1B / interleaved schedules run unchanged and only the student trains and is
checkpointed. Outside Megatron-LM, call :func:`configure` instead of passing the flags.

MindSpeed-LLM's ``pretrain`` (``mindspeed_llm.training.training``, which runs Megatron-LM
core_v0.12's model building and ``train_step``) takes the same three with the same
``extra_args_provider`` keyword; docs/megatron_lm.md lists the lines for both.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.utils import get_attr_wrapped_model

from megatron_prune.distill.loss import DistillLossConfig, distillation_loss
from megatron_prune.distill.pair import DistillationChunk
from megatron_prune.errors import UserError


@dataclass(frozen=True)
class KDSettings:
    teacher: Path
    loss: DistillLossConfig
    teacher_bf16: bool = False
    sequence_parallel: bool = False  # must match the student's

    @functools.cached_property
    def vocab_size(self) -> int:
        """The real (unpadded) vocabulary: padding ids get no probability in the loss."""
        from megatron_prune.checkpoint.metadata import CheckpointMeta

        return CheckpointMeta.read(self.teacher).arch.vocab_size


_settings: KDSettings | None = None
_teachers: dict[int | None, torch.nn.Module] = {}


def add_distillation_args(
    parser: argparse.ArgumentParser, *, also: Callable | None = None
) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: the --kd-* flags (listed by ``--help``). ``also``
    chains a provider the script already passes (``pretrain_gpt.py``'s ModelOpt flags):
    ``extra_args_provider=functools.partial(kd.add_distillation_args, also=add_modelopt_args)``.
    """
    if also is not None:
        parser = also(parser)
    group = parser.add_argument_group("megatron-prune distillation")
    group.add_argument("--kd-teacher", required=True,
                       help="teacher checkpoint (megatron-prune's, or Megatron-LM's)")  # fmt: skip
    group.add_argument("--kd-temperature", type=float, default=1.0)
    group.add_argument("--kd-reverse", action="store_true", help="KL(student || teacher)")
    group.add_argument("--kd-top-k", type=int, default=None)
    group.add_argument("--kd-lm-weight", type=float, default=0.0, help="share of LM loss")
    group.add_argument("--kd-teacher-bf16", action="store_true")
    return parser


def configure(settings: KDSettings) -> None:
    """Set the distillation settings directly (scripts that do not use Megatron-LM's args)."""
    global _settings
    _settings = settings
    _teachers.clear()


def settings_from_args(args: argparse.Namespace) -> KDSettings:
    """The settings the --kd-* flags (and Megatron-LM's ``--sequence-parallel``) describe.
    Under Megatron-LM's own ``--bf16`` the teacher is held in bf16 too, as the student is
    (Megatron-LM's Float16Module casts the student; the pair keeps the teacher's dtype)."""
    if getattr(args, "export_kd_teacher_load", None):
        raise UserError(
            "--kd-teacher and ModelOpt's --export-kd-teacher-load both distil: megatron-prune's "
            "trio replaces ModelOpt's distillation, so drop --export-kd-teacher-load"
        )
    loss = DistillLossConfig(temperature=args.kd_temperature, reverse=args.kd_reverse,
                             top_k=args.kd_top_k, lm_weight=args.kd_lm_weight)  # fmt: skip
    teacher_bf16 = bool(args.kd_teacher_bf16 or getattr(args, "bf16", False))
    return KDSettings(Path(args.kd_teacher), loss, teacher_bf16,
                      bool(getattr(args, "sequence_parallel", False)))  # fmt: skip


def settings() -> KDSettings:
    """The active settings: :func:`configure`'s, else Megatron-LM's parsed --kd-* flags."""
    global _settings
    if _settings is None:
        from megatron.training import get_args  # Megatron-LM, not megatron-core

        _settings = settings_from_args(get_args())
    return _settings


def _teacher_chunk(vp_stage: int | None) -> torch.nn.Module:
    """This rank's teacher chunk for ``vp_stage``. All chunks are built and loaded together on
    the first call (dist checkpoints of interleaved models load in one call), before any student
    chunk: building a tied-embedding chunk is collective, so every rank must build in the same
    order."""
    if vp_stage not in _teachers:
        from megatron_prune.accelerator import detect
        from megatron_prune.checkpoint.megatron_io import load_model
        from megatron_prune.distributed import model_device

        cfg = settings()
        dtype = torch.bfloat16 if cfg.teacher_bf16 else torch.float32
        loaded = load_model(cfg.teacher, sequence_parallel=cfg.sequence_parallel,
                            params_dtype=dtype, device=model_device(detect()))  # fmt: skip
        stages = [None] if len(loaded.chunks) == 1 else range(len(loaded.chunks))
        _teachers.update(zip(stages, loaded.chunks, strict=True))
    return _teachers[vp_stage]


def _virtual_stage(kwargs: dict) -> int | None:
    """The virtual pipeline stage a provider call builds. Megatron-LM core_v0.13 and later pass
    ``vp_stage=i``; core_v0.12 (the Megatron-LM under MindSpeed-LLM) passes no ``vp_stage`` and
    sets the virtual rank in parallel_state before each call instead (training.py:901-909 of
    core_v0.12.1's ``get_model``)."""
    if kwargs.get("vp_stage") is not None:
        return kwargs["vp_stage"]
    from megatron.core import parallel_state

    if parallel_state.get_virtual_pipeline_model_parallel_world_size() is None:
        return None
    return parallel_state.get_virtual_pipeline_model_parallel_rank()


def distillation_model_provider(student_provider: Callable[..., torch.nn.Module]):
    """Wrap a Megatron-LM model provider: each student chunk it builds is paired with the
    teacher's chunk of the same (virtual) pipeline stage. The student provider gets exactly the
    arguments the training loop passed (MindSpeed-LLM's ``model_provider`` takes only
    ``pre_process`` and ``post_process``)."""

    def provider(pre_process: bool = True, post_process: bool = True, **kwargs):
        teacher = _teacher_chunk(_virtual_stage(kwargs))
        student = student_provider(pre_process=pre_process, post_process=post_process,
                                   **kwargs)  # fmt: skip
        if student.config.sequence_parallel != settings().sequence_parallel:
            raise UserError("teacher and student must agree on sequence parallelism")
        student.config.calculate_per_token_loss = True
        return DistillationChunk(student, teacher)

    return provider


class LossReport(tuple):
    """One logged value of one micro-batch, ``(sum, tokens)`` summed over the data-parallel
    ranks, in a form both generations of Megatron-LM's ``train_step`` average by tokens:

    * core_v0.12 (and MindSpeed-LLM, which runs it) reads a tuple or list as (numerator,
      denominator) and reduces nothing over data parallelism itself, so the loss function
      must (``pretrain_gpt.py``'s own returns ``(reporting_loss[0], reporting_loss[1])``
      after a DP all-reduce); a tensor there is averaged per micro-batch and breaks the log.
    * core_v0.13 and later call ``.view(-1)`` on each value, expect two elements and sum them
      over data parallelism: both entries grow by the same factor, the ratio it logs is
      unchanged.
    """

    def view(self, *shape: int) -> torch.Tensor:
        return torch.stack(tuple(self)).view(*shape)


def loss_func(labels: torch.Tensor, loss_mask: torch.Tensor, output):
    """Megatron loss function on the last stage: (summed loss, tokens, {name: LossReport})."""
    from megatron.core import parallel_state

    cfg = settings()
    total, tokens, report = distillation_loss(cfg.loss, cfg.vocab_size, labels, loss_mask, output)
    names = list(report)
    summed = torch.stack([report[n] for n in names])  # [metrics, 2]: one all-reduce for all
    torch.distributed.all_reduce(summed, group=parallel_state.get_data_parallel_group())
    return total, tokens, {n: LossReport(summed[i].unbind()) for i, n in enumerate(names)}


_NO_DATA = {"tokens": None, "position_ids": None, "attention_mask": None, "labels": None,
            "loss_mask": None}  # fmt: skip


def _next_batch(data_iterator, model) -> dict[str, torch.Tensor | None]:
    """This chunk's micro-batch. Chunks that are neither a first nor a last (virtual) stage
    take no data: Megatron-LM hands them ``data_iterator=None`` and they read their input from
    the previous stage. Otherwise Megatron-LM's batch on this TP rank (broadcast from TP rank
    0), or the iterator's own outside Megatron-LM."""
    pre = get_attr_wrapped_model(model, "pre_process")
    post = get_attr_wrapped_model(model, "post_process")
    if not (pre or post):
        return dict(_NO_DATA)
    try:
        from megatron.training.utils import get_batch_on_this_tp_rank
    except ImportError:
        return next(data_iterator)
    return get_batch_on_this_tp_rank(data_iterator)


def forward_step(data_iterator, model: DistillationChunk):
    """Megatron ``forward_step``: run teacher and student on one micro-batch."""
    batch = _next_batch(data_iterator, model)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))
    return output, functools.partial(loss_func, batch["labels"], batch["loss_mask"])
