"""What the two imitations of a Megatron training entry (megatron_lm_trio.py: Megatron-LM's
pretrain(); mindspeed_llm_trio.py: MindSpeed-LLM's) share: the student's architecture, the
DDP / optimizer / checkpoint-load steps both loops take from Megatron-LM, the training data and
the report. Each worker keeps its own order of calls; only the steps themselves live here."""

import json
from pathlib import Path

import torch


def student_arch(spec: dict):
    """(checkpoint metadata, TransformerConfig) of the student: what a real script's
    model_provider would build from its Megatron-LM flags."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.models.gpt import transformer_config

    meta = CheckpointMeta.read(spec["student"])
    return meta, transformer_config(meta.arch, initialize=False)


def build_student_chunk(meta, config, vp_stage):
    """One student chunk with its tensor-parallel tags (as GPTModel built with initialisation)."""
    from megatron_prune.models.gpt import build_chunk, tag_tensor_parallel_params

    chunk = build_chunk(meta.arch, config, vp_stage=vp_stage)
    tag_tensor_parallel_params(chunk)
    return chunk


def load_student(pairs: list, student: str) -> None:
    """Megatron-LM's --load on the unwrapped chunks: dist checkpointing fills the pairs' (= the
    students') sharded state, then load_state_dict(strict=True) on each chunk."""
    from megatron_prune.checkpoint.megatron_io import load_sharded, sharded_model_state

    state = load_sharded(sharded_model_state(pairs), Path(student))
    keys = ["model"] if len(pairs) == 1 else [f"model{i}" for i in range(len(pairs))]
    for pair, key in zip(pairs, keys, strict=True):
        pair.load_state_dict(state[key], strict=True)


def wrap_ddp(pairs: list) -> list:
    """get_model's DDP step: every chunk wrapped with the first chunk's config, bucketing
    disabled past the first chunk."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.utils import get_model_config

    config = get_model_config(pairs[0])
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=p,
                                disable_bucketing=i > 0)
        for i, p in enumerate(pairs)
    ]  # fmt: skip


def build_optimizer(model: list):
    """megatron-core's optimizer over the DDP chunks, with `megatron-prune distill`'s settings."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_prune.accelerator import cuda_type_names

    with cuda_type_names():
        return get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, clip_grad=1.0,
                            weight_decay=0.01, adam_beta2=0.95, params_dtype=torch.float32),
            model,
        )  # fmt: skip


def micro_batches(spec: dict, meta, steps: int, global_batch: int = 4) -> list[list[dict]]:
    """This DP rank's micro-batches of each of ``steps`` steps: the command's data, in its order."""
    from megatron.core import parallel_state

    from megatron_prune.data.training import (
        GlobalBatches,
        TokenizerView,
        build_train_dataset,
        parse_blend,
    )

    dataset = build_train_dataset(
        parse_blend([spec["data"]]), samples=steps * global_batch, seq_len=32,
        tokenizer=TokenizerView(meta.arch.vocab_size, meta.tokenizer["eos_id"]), seed=1234,
        cache_dir=Path(spec["out"]).parent / "trio_cache",
    )  # fmt: skip
    batches = GlobalBatches(
        dataset, global_batch=global_batch, micro_batch=1,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )  # fmt: skip
    return [batches.step(s, torch.device("cpu")) for s in range(steps)]


def pair_report(pairs: list) -> dict:
    """What must hold of the pairs after training: the teacher frozen, in eval mode, absent from
    the checkpoint; how many chunks ran as middle stages."""
    saved = pairs[0].sharded_state_dict()
    return {
        "teacher_trainable": any(p.requires_grad for q in pairs for p in q.teacher.parameters()),
        "teacher_in_train_mode": any(m.training for p in pairs for m in p.teacher.modules()),
        "middle_chunks": sum(not (p.pre_process or p.post_process) for p in pairs),
        "checkpoint_holds_teacher": any("teacher" in k for k in saved),
    }


def write_report(spec: dict, report: dict) -> None:
    """The last rank (a last pipeline stage) writes the report pytest reads."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        Path(spec["out"]).write_text(json.dumps(report))
