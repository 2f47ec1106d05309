"""The Megatron-LM trio (model provider, forward_step, loss) driven the way MindSpeed-LLM's
training entry drives it, for a few steps. Reports each step's loss, KL, CE and grad norm.
usage: mindspeed_llm_trio.py SPEC.json  (spec: teacher, student, data, layout, loss, steps, out)

Read at Ascend/MindSpeed-LLM tag v26.1.0 ("MS" = mindspeed_llm/training/training.py) and the
Megatron-LM it runs, core_v0.12.1 ("MLM" = megatron/training/training.py; MS's pretrain()
rebuilds its loop from MLM's get_model, setup_model_and_optimizer and train_step). The order of
calls below is theirs; each step cites the lines it imitates.

Megatron-LM's training package is not installable here (no PyPI release), so `_install_megatron_
training` provides the two functions of it the trio calls: ``get_args`` (the namespace parsed
below) and ``megatron.training.utils.get_batch_on_this_tp_rank`` as MindSpeed-LLM patches it.
Everything else (parallel state, DDP, optimizer, LR scheduler, the interleaved schedule,
finalize_model_grads, dist checkpointing) is megatron-core's own code.
"""

import argparse
import json
import sys
import types
from pathlib import Path

import torch


def _install_megatron_training(args: argparse.Namespace) -> None:
    """Stand-ins for megatron.training.get_args and for MindSpeed-LLM's
    get_batch_on_this_tp_rank (mindspeed_llm/training/utils.py:562-625 at TP=1: TP rank 0 reads
    ``next(data_iterator)`` and moves the tensors with ``.cuda()``; its TP broadcasts are no-ops
    in a TP group of one)."""
    from megatron.core import parallel_state

    def get_batch_on_this_tp_rank(data_iterator):
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        data = next(data_iterator)
        return {"tokens": data["tokens"].cuda(non_blocking=True),
                "labels": data["labels"].cuda(non_blocking=True),
                "loss_mask": data["loss_mask"].cuda(non_blocking=True),
                "attention_mask": None if "attention_mask" not in data
                else data["attention_mask"].cuda(non_blocking=True),
                "position_ids": data["position_ids"].cuda(non_blocking=True)}  # fmt: skip

    training = types.ModuleType("megatron.training")
    training.get_args = lambda: args
    utils = types.ModuleType("megatron.training.utils")
    utils.get_batch_on_this_tp_rank = get_batch_on_this_tp_rank
    training.utils = utils
    sys.modules["megatron.training"] = training
    sys.modules["megatron.training.utils"] = utils


def _parse_args(extra_args_provider, argv: list[str]) -> argparse.Namespace:
    """MLM's parse_args as MindSpeed-LLM patches it (mindspeed_llm/training/arguments.py:46-51,
    69-72): the script's extra_args_provider first, then MindSpeed-LLM's feature flags."""
    parser = argparse.ArgumentParser(description="Megatron-LM Arguments", allow_abbrev=False)
    parser.add_argument("--sequence-parallel", action="store_true")  # one of Megatron-LM's own
    parser = extra_args_provider(parser)
    # process_args_v2: MindSpeedFeaturesManager.register_features_args, e.g. training_basic's
    # group (mindspeed_llm/features_manager/megatron_basic/training_basic.py:120-127)
    group = parser.add_argument_group(title="training_basic")
    group.add_argument("--jit-compile", action="store_true", default=False)
    group.add_argument("--load-checkpoint-loosely", action="store_true", default=False)
    return parser.parse_args(argv)


def main() -> None:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_prune import megatron_lm as kd
    from megatron_prune.accelerator import cuda_type_names
    from megatron_prune.compat import vp_kwargs
    from megatron_prune.distributed import ParallelLayout, initialize
    from tests.workers import trio_common as trio

    spec = json.loads(Path(sys.argv[1]).read_text())
    steps, global_batch = spec["steps"], 4
    initialize(ParallelLayout(**spec["layout"]), "cpu")
    meta, config = trio.student_arch(spec)
    seen = {}

    def model_provider(pre_process=True, post_process=True):
        # pretrain_gpt.py:43 has exactly this signature; on megatron-core 0.12 its GPTModel takes
        # the virtual stage from parallel_state, which get_model set just before the call
        seen.setdefault("provider_calls", []).append([pre_process, post_process])
        vp_stage = parallel_state.get_virtual_pipeline_model_parallel_rank()
        return trio.build_student_chunk(meta, config, vp_stage)

    def train_valid_test_datasets_provider(train_val_test_num_samples):
        return trio.micro_batches(spec, meta, steps, global_batch), None, None

    def pretrain(train_valid_test_dataset_provider, model_provider, model_type,
                 forward_step_func, process_non_loss_data_func=None, extra_args_provider=None,
                 args_defaults=None):  # fmt: skip  # MS 430-436 (there: args_defaults={})
        # MS 467: initialize_megatron(extra_args_provider=...) parses the flags
        loss = spec["loss"]
        args = _parse_args(extra_args_provider, [
            "--kd-teacher", spec["teacher"], "--kd-temperature", str(loss["temperature"]),
            "--kd-lm-weight", str(loss["lm_weight"])])  # fmt: skip
        _install_megatron_training(args)
        # MS 359-361 -> MLM 1116 setup_model_and_optimizer -> get_model (MLM 888-1030); MS's
        # get_model_wrapper (MS 234-239) passes the provider through model_provider_func_wrapper,
        # which calls it with the same *args, **kwargs (MS 139-142)
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
        model = []
        for i in range(vpp or 1):
            if vpp is not None:
                parallel_state.set_virtual_pipeline_model_parallel_rank(i)  # MLM 902
            # MLM 904-905; core 0.12's stage tests read the virtual rank set above, 0.13+ take
            # it as vp_stage
            stage = parallel_state.get_virtual_pipeline_model_parallel_rank()
            pre_process = parallel_state.is_pipeline_first_stage(False, **vp_kwargs(stage))
            post_process = parallel_state.is_pipeline_last_stage(False, **vp_kwargs(stage))
            this_model = model_provider(pre_process=pre_process, post_process=post_process)
            this_model.model_type = model_type  # MLM 906-911
            model.append(this_model)
        for chunk in model:  # MLM 951-953
            for param in chunk.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        pairs = list(model)
        model = trio.wrap_ddp(pairs)  # MLM 986-1030 (fp32: no Float16Module, MLM 975-977)
        optimizer = trio.build_optimizer(model)  # MLM 1125
        scheduler = OptimizerParamScheduler(  # MLM 1128 -> get_optimizer_param_scheduler 1049-1100
            optimizer, init_lr=0.0, max_lr=1e-3, min_lr=1e-5, lr_warmup_steps=0,
            lr_decay_steps=steps * global_batch, lr_decay_style="cosine", start_wd=0.01,
            end_wd=0.01, wd_incr_steps=steps * global_batch, wd_incr_style="constant",
        )  # fmt: skip
        # MLM 1165 load_checkpoint, which MindSpeed-LLM's wrapper hands the unwrapped chunks
        # (mindspeed_llm/training/checkpointing.py:120-126)
        trio.load_student(pairs, spec["student"])  # --load STUDENT
        config = get_model_config(model[0])  # MS 366
        # MS 372-382: with a virtual pipeline, one data iterator per chunk, middle ones included
        train_data, _, _ = train_valid_test_dataset_provider([steps * global_batch, 0, 0])
        flat = [mb for step in train_data for mb in step]
        train_data_iterator = [iter(flat) for _ in model] if vpp else iter(flat)
        # MS 536-540 -> train (MS 581-): every chunk in training mode (593-594), the config hooks
        # (612-631; no_sync_func stays None without --overlap-grad-reduce)
        for model_module in model:
            model_module.train()
        config.grad_scale_func = optimizer.scale_loss
        config.timers = None
        config.finalize_model_grads_func = finalize_model_grads
        total_loss_dict, history = {}, []
        for _ in range(steps):  # MS 687-715: train_step(forward_step_func, ...) each iteration
            loss_dict, grad_norm = train_step(forward_step_func, train_data_iterator, model,
                                              optimizer, scheduler, len(train_data[0]))  # fmt: skip
            history.append({**training_log(loss_dict, total_loss_dict), "grad_norm": grad_norm,
                            "lr": optimizer.param_groups[0]["lr"]})  # fmt: skip
        return pairs, history

    def train_step(forward_step_func, data_iterator, model, optimizer, scheduler, micro_batches):
        """MLM 1213-1322 (no CUDA graphs, no rerun, fp32)."""
        for model_chunk in model:  # MLM 1235-1237
            model_chunk.zero_grad_buffer()
        optimizer.zero_grad()
        losses_reduced = get_forward_backward_func()(  # MLM 1240-1249
            forward_step_func=forward_step_func, data_iterator=data_iterator,
            model=model if len(model) > 1 else model[0], num_microbatches=micro_batches,
            seq_length=32, micro_batch_size=1, decoder_seq_length=None, forward_only=False,
        )  # fmt: skip
        with cuda_type_names():
            update_successful, grad_norm, _ = optimizer.step()  # MLM 1266
        assert update_successful
        # MLM 1274: reduce_max_stat_across_model_parallel_group(grad_norm)
        norm = torch.tensor([grad_norm], dtype=torch.float32)
        torch.distributed.all_reduce(norm, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_model_parallel_group())  # fmt: skip
        increment = micro_batches * 1 * parallel_state.get_data_parallel_world_size()
        scheduler.step(increment=increment)  # MLM 1284-1288
        loss_reduced = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):  # MLM 1302-1320
            for key in losses_reduced[0].keys():
                numerator = 0
                denominator = 0
                for x in losses_reduced:
                    val = x[key]
                    if isinstance(val, tuple) or isinstance(val, list):
                        numerator += val[0]
                        denominator += val[1]
                    else:
                        numerator += val
                        denominator += 1
                loss_reduced[key] = numerator / denominator
        return loss_reduced, float(norm)

    def training_log(loss_dict, total_loss_dict):
        """MS 956-959 (accumulate) and 1174-1181 (print every --log-interval 1 iteration)."""
        logged = {}
        for key in loss_dict:
            zero = torch.tensor([0.0], dtype=torch.float, device="cpu")  # MS: device='cuda'
            total_loss_dict[key] = total_loss_dict.get(key, zero) + loss_dict[key]
            logged[key] = total_loss_dict[key].item() / 1.0  # one advanced iteration per log
            total_loss_dict[key] = zero
        return logged

    # The user's lines (docs/megatron_lm.md, "MindSpeed-LLM"): pretrain_gpt.py:302-305 with the
    # provider wrapped, kd.forward_step, and the --kd-* flags
    pairs, history = pretrain(
        train_valid_test_datasets_provider,
        kd.distillation_model_provider(model_provider),
        ModelType.encoder_or_decoder,
        kd.forward_step,
        extra_args_provider=kd.add_distillation_args,
    )
    report = {"steps": history, "provider_calls": seen["provider_calls"],
              "sequence_parallel": kd.settings().sequence_parallel,
              **trio.pair_report(pairs)}  # fmt: skip
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        trio.write_report(spec, report)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
