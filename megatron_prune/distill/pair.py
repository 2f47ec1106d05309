"""Teacher and student as one pipeline model, so Megatron's own schedules run both stage by stage.

Each virtual-pipeline chunk of the pair holds the student's and the teacher's chunk for the same
stage. Between stages the pair sends one tensor, the teacher's hidden states concatenated with
the student's on the last dimension ([s, b, h_t + h_s], or [s/t, b, h_t + h_s] with sequence
parallelism), which is why the pair's ``config`` (the one the schedules read) reports
``hidden_size = h_t + h_s``. The teacher part carries no gradient: it is detached on send and
on receipt, so the backward pass moves the student's gradients only. On the last stage the pair
returns both logits shards and the loss function compares them.

Works with the 1F1B and the interleaved schedule alike (the interleaved one has no hook for
per-model tensor shapes; a wider hidden size is all it needs).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.utils import get_attr_wrapped_model

from megatron_prune.compat import unwrap_model


class DistillationChunk(torch.nn.Module):
    """One pipeline chunk of a (trainable student, frozen teacher) pair.

    ``student`` may be wrapped in Megatron's DistributedDataParallel; ``teacher`` is a plain
    GPTModel chunk, put in eval mode with gradients off (it may hold bf16 weights).
    """

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        teacher.eval()
        teacher.requires_grad_(False)
        student_config = get_attr_wrapped_model(student, "config")
        teacher_config = get_attr_wrapped_model(teacher, "config")
        self.teacher_hidden = teacher_config.hidden_size
        # The schedules size their send/receive buffers from config.hidden_size and set their
        # hooks (no_sync, finalize_model_grads) on it: a copy keeps the student's own untouched.
        self.config = copy.copy(student_config)
        self.config.hidden_size = teacher_config.hidden_size + student_config.hidden_size
        self.vp_stage = getattr(unwrap_model(student), "vp_stage", None)
        self.model_type = get_attr_wrapped_model(student, "model_type")
        self._transport_dtype = student_config.pipeline_dtype or torch.float32

    # What Megatron(-LM) asks of a model chunk besides forward: the pipeline position and the
    # tied-embedding hooks come from the student; checkpoints hold the student alone.
    @property
    def pre_process(self) -> bool:
        return unwrap_model(self.student).pre_process

    @property
    def post_process(self) -> bool:
        return unwrap_model(self.student).post_process

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return unwrap_model(self.student).share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return unwrap_model(self.student).shared_embedding_or_output_weight()

    def __getattr__(self, name: str):
        """Whatever else the training loop reads off a model chunk (Megatron-LM's ``train()``
        asks for ``pg_collection``, say) is the student's: the pair stands in for it."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            student = self._modules.get("student")
            if student is None or name.startswith("_"):
                raise
            return getattr(unwrap_model(student), name)

    def sharded_state_dict(self, *args, **kwargs) -> dict:
        return unwrap_model(self.student).sharded_state_dict(*args, **kwargs)

    # Megatron-LM's load_checkpoint fills the tensors through dist checkpointing, then calls
    # load_state_dict(strict=True) on the (unwrapped) chunk: both see the student alone.
    def state_dict(self, *args, **kwargs):
        return unwrap_model(self.student).state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, *args, **kwargs):
        return unwrap_model(self.student).load_state_dict(state_dict, strict, *args, **kwargs)

    def train(self, mode: bool = True) -> DistillationChunk:
        """Train the student; the teacher stays in eval mode whatever the training loop asks."""
        super().train(mode)
        self.teacher.eval()
        return self

    # Megatron-LM's Float16Module casts its module with .bfloat16() / .half(): the student
    # follows, the teacher keeps the dtype it was loaded in (fp32, or bf16 by choice).
    def bfloat16(self) -> DistillationChunk:
        self.student.bfloat16()
        return self

    def half(self) -> DistillationChunk:
        self.student.half()
        return self

    def set_input_tensor(self, input_tensor) -> None:
        """Receive the previous stage's [.., h_t + h_s] tensor and hand each model its part."""
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        if input_tensor is None:
            teacher_part = student_part = None
        else:
            teacher_dtype = next(self.teacher.parameters()).dtype
            teacher_part = input_tensor[..., : self.teacher_hidden].detach().to(teacher_dtype)
            student_part = input_tensor[..., self.teacher_hidden :].contiguous()
        get_attr_wrapped_model(self.teacher, "set_input_tensor")(teacher_part)
        get_attr_wrapped_model(self.student, "set_input_tensor")(student_part)

    def forward(self, input_ids, position_ids, attention_mask):
        with torch.no_grad():
            teacher_out = self.teacher(input_ids, position_ids, attention_mask)
        student_out = self.student(input_ids, position_ids, attention_mask)
        if unwrap_model(self.student).post_process:
            return student_out, teacher_out  # [b, s, Vp/t] logits shards, to the loss function
        teacher_out = teacher_out.to(self._transport_dtype)
        return torch.cat([teacher_out, student_out.to(self._transport_dtype)], dim=-1)


def pair_chunks(
    students: list[torch.nn.Module], teachers: list[torch.nn.Module]
) -> list[DistillationChunk]:
    """Zip this rank's student and teacher chunks (same layout, same number of VPP chunks)."""
    if len(students) != len(teachers):
        raise ValueError(
            f"student has {len(students)} virtual-pipeline chunks and teacher {len(teachers)}: "
            "both must be built at the same layout"
        )
    pairs = [DistillationChunk(s, t) for s, t in zip(students, teachers, strict=True)]
    for pair in pairs[1:]:  # the schedules read one config: its hooks must be seen by all
        pair.config = pairs[0].config
    return pairs
