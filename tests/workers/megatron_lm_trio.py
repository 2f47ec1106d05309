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
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prune import megatron_lm as kd
    from megatron_prune.accelerator import cuda_type_names
    from megatron_prune.distill.loss import DistillLossConfig
    from megatron_prune.distributed import ParallelLayout, initialize
    from tests.workers import trio_common as trio

    spec = json.loads(Path(sys.argv[1]).read_text())
    initialize(ParallelLayout(**spec["layout"]), "cpu")
    kd.configure(kd.KDSettings(Path(spec["teacher"]), DistillLossConfig(**spec["loss"])))
    meta, config = trio.student_arch(spec)

    def student_provider(pre_process=True, post_process=True, vp_stage=None, **_):
        # stands in for pretrain_gpt's model_provider (its args come from the checkpoint here)
        return trio.build_student_chunk(meta, config, vp_stage)

    provider = kd.distillation_model_provider(student_provider)
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    pairs = [provider(vp_stage=s) for s in ([None] if vpp is None else range(vpp))]
    trio.load_student(pairs, spec["student"])
    for p in pairs:
        p.train()  # Megatron-LM's train() puts every chunk in training mode
    model = trio.wrap_ddp(pairs)
    schedule_config = pairs[0].config
    schedule_config.no_sync_func = model[0].no_sync if len(model) == 1 else [
        m.no_sync for m in model
    ]  # fmt: skip
    schedule_config.finalize_model_grads_func = finalize_model_grads
    optimizer = trio.build_optimizer(model)
    (batches,) = trio.micro_batches(spec, meta, steps=1)
    for m in model:
        m.zero_grad_buffer()
    # as Megatron-LM does: only first / last (virtual) stages get an iterator
    iterators = [iter(batches) if (p.pre_process or p.post_process) else None for p in pairs]
    outputs = get_forward_backward_func()(
        forward_step_func=kd.forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],  # None in the middle
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(batches),
        seq_length=32,
        micro_batch_size=1,
        forward_only=False,
    )
    with cuda_type_names():
        _, grad_norm, _ = optimizer.step()
    report = {"grad_norm": float(grad_norm), **trio.pair_report(pairs)}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        # Megatron-LM core_v0.13+'s train_step: each value .view(-1) as [sum, tokens]
        sums = torch.vstack([o["loss"].view(-1) for o in outputs]).sum(dim=0)
        report["loss"] = float(sums[0] / sums[1])
        trio.write_report(spec, report)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
