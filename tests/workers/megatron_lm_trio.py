"""The Megatron-LM trio (model provider, forward_step, loss) driven the way Megatron-LM's
pretrain() drives it: providers per virtual stage, DDP around each returned chunk, megatron's
optimizer over those, the schedule with kd.forward_step. Reports step-1 loss and grad norm.
usage: megatron_lm_trio.py SPEC.json  (spec: teacher, student, data, layout, loss, out)"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune import megatron_lm as kd
    from megatron_prune.accelerator import cuda_type_names
    from megatron_prune.checkpoint.megatron_io import load_sharded, sharded_model_state
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.data.training import (
        GlobalBatches,
        TokenizerView,
        build_train_dataset,
        parse_blend,
    )
    from megatron_prune.distill.loss import DistillLossConfig
    from megatron_prune.distributed import ParallelLayout, initialize
    from megatron_prune.models.gpt import (
        build_chunk,
        tag_tensor_parallel_params,
        transformer_config,
    )

    spec = json.loads(Path(sys.argv[1]).read_text())
    layout = ParallelLayout(**spec["layout"])
    initialize(layout, "cpu")
    kd.configure(kd.KDSettings(Path(spec["teacher"]), DistillLossConfig(**spec["loss"])))
    meta = CheckpointMeta.read(spec["student"])
    config = transformer_config(meta.arch, initialize=False)

    def student_provider(pre_process=True, post_process=True, vp_stage=None, **_):
        # stands in for pretrain_gpt's model_provider (its args come from the checkpoint here)
        chunk = build_chunk(meta.arch, config, vp_stage=vp_stage)
        tag_tensor_parallel_params(chunk)
        return chunk

    provider = kd.distillation_model_provider(student_provider)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    pairs = [provider(vp_stage=s) for s in ([None] if vpp is None else range(vpp))]
    # Megatron-LM's --load: dist checkpointing fills the pairs' (= the students') sharded state,
    # then load_state_dict(strict=True) on each unwrapped chunk
    state = load_sharded(sharded_model_state(pairs), Path(spec["student"]))
    keys = ["model"] if len(pairs) == 1 else [f"model{i}" for i in range(len(pairs))]
    for p, key in zip(pairs, keys, strict=True):
        p.load_state_dict(state[key], strict=True)
        p.train()  # Megatron-LM's train() puts every chunk in training mode
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    model = [
        DistributedDataParallel(config=p.config, ddp_config=ddp_config, module=p,
                                disable_bucketing=i > 0)
        for i, p in enumerate(pairs)
    ]  # fmt: skip
    schedule_config = pairs[0].config
    schedule_config.no_sync_func = model[0].no_sync if len(model) == 1 else [
        m.no_sync for m in model
    ]  # fmt: skip
    schedule_config.finalize_model_grads_func = finalize_model_grads
    with cuda_type_names():
        optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, weight_decay=0.01,
                            adam_beta2=0.95, params_dtype=torch.float32),
            model,
        )  # fmt: skip
    dataset = build_train_dataset(
        parse_blend([spec["data"]]), samples=4, seq_len=32,
        tokenizer=TokenizerView(meta.arch.vocab_size, meta.tokenizer["eos_id"]), seed=1234,
        cache_dir=Path(spec["out"]).parent / "trio_cache",
    )  # fmt: skip
    batches = GlobalBatches(
        dataset, global_batch=4, micro_batch=1,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    ).step(0, torch.device("cpu"))  # fmt: skip
    for m in model:
        m.zero_grad_buffer()
    outputs = get_forward_backward_func()(
        forward_step_func=kd.forward_step,
        # as Megatron-LM does: only first / last (virtual) stages get an iterator
        data_iterator=[iter(batches) if (p.pre_process or p.post_process) else None
                       for p in pairs] if len(model) > 1 else iter(batches),  # fmt: skip
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=32,
        micro_batch_size=1,
        forward_only=False,
    )
    with cuda_type_names():
        _, grad_norm, _ = optimizer.step()
    saved = pairs[0].sharded_state_dict()
    report = {
        "grad_norm": float(grad_norm),
        "teacher_trainable": any(p.requires_grad for p in pairs[0].teacher.parameters()),
        "teacher_in_train_mode": any(m.training for p in pairs for m in p.teacher.modules()),
        "middle_chunks": sum(not (p.pre_process or p.post_process) for p in pairs),
        "checkpoint_holds_teacher": any("teacher" in k for k in saved),
    }
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        total = sum(float(o["loss"][0]) for o in outputs)
        tokens = sum(float(o["loss"][1]) for o in outputs)
        report["loss"] = total / tokens
        if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
            Path(spec["out"]).write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
