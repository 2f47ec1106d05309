"""The Python API: one function per stage, the same functions the CLI calls.

Each function checks its inputs first (raising :class:`~megatron_prune.errors.UserError` before
any work), then brings up torch.distributed and Megatron's parallel state for ``layout`` (a
world of one in a plain process; under torchrun, every rank calls the same function with the
same arguments) and writes its outputs atomically. A script that scores, prunes and evaluates::

    from megatron_prune import api
    from megatron_prune.distributed import ParallelLayout

    api.convert("gguf:SmolLM2.gguf", "ckpt")
    api.score("ckpt", "calibration.txt", "scores", samples=32, seq_len=512)
    api.prune("ckpt", "scores", {"hidden_size": 448, "ffn_hidden_size": 1152}, "pruned",
              clap=False, slnp=True)
    print(api.perplexity("pruned", "heldout.txt").ppl)

``api.plan("ckpt", "scores", "plan.yaml", budget="params=0.5", strategy="alpha")`` writes a
target for ``prune`` from a budget; ``api.report(["run"], "run/report")`` writes a markdown
report with plots from finished run folders; ``api.bench(["ckpt", "pruned"])`` times
models (prefill, decode, training step; one record each).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megatron_prune.checkpoint.atomic import check_output
from megatron_prune.checkpoint.size import checkpoint_bytes, training_run_bytes
from megatron_prune.compute import ComputeOptions
from megatron_prune.distributed import ParallelLayout
from megatron_prune.errors import DataError, UserError
from megatron_prune.inputs import check_utf8
from megatron_prune.inputs import read_text as _read_text
from megatron_prune.paths import (
    check_free_space,
    check_not_input,
    check_unlocked,
    check_writable,
)

__all__ = [
    "bench",
    "build_dataset",
    "check_bench",
    "check_build_dataset",
    "check_convert",
    "check_distill",
    "check_perplexity",
    "check_text",
    "check_prune",
    "check_score",
    "convert",
    "distill",
    "export_hf",
    "generate",
    "megatron_lm_args",
    "perplexity",
    "check_plan",
    "check_report",
    "plan",
    "prune",
    "report",
    "score",
    "check_sparsify",
    "sparsify",
]


def _layout(layout: ParallelLayout | None) -> ParallelLayout:
    return layout or ParallelLayout()


def check_text(path: str | Path, flag: str) -> Path:
    """A UTF-8 text file that exists and is not empty (``flag`` names it in errors)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{flag} {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{flag} {path} is empty")
    check_utf8(path, flag)
    return path


def _check_sequence_parallel(layout: ParallelLayout, lengths: dict[str, int]) -> None:
    """Sequence parallelism splits every sequence over the TP ranks: each length must divide."""
    if not layout.sequence_parallel:
        return
    bad = {what: n for what, n in lengths.items() if n % layout.tp}
    if bad:
        said = ", ".join(f"{what} {n}" for what, n in bad.items())
        raise UserError(f"--sequence-parallel splits each sequence over TP={layout.tp} ranks, "
                        f"but {said} is not a multiple of {layout.tp}: choose multiples of "
                        f"{layout.tp} or drop --sequence-parallel")  # fmt: skip


# ----------------------------------------------------------------------------------- convert


def check_convert(src: str, dst: str | Path, *, to: str = "megatron",
                  layout: ParallelLayout | None = None, overwrite: bool = False,
                  tokenizer: str | Path | None = None):  # fmt: skip
    """Every check of :func:`convert` that needs no tensor; returns the opened source."""
    from megatron_prune.checkpoint.sources import open_source

    layout = _layout(layout)
    if to not in ("megatron", "hf"):
        raise UserError(f"--to {to!r}: choose megatron or hf")
    check_not_input(dst, "DST", {"SRC": src, "--tokenizer": tokenizer})
    check_output(Path(dst), overwrite)
    source = open_source(src, tokenizer)
    if to == "hf" and layout.model_parallel_size != 1:
        raise UserError("--to hf writes whole tensors: leave --tp/--pp at 1")
    source.arch.check_layout(layout.tp, layout.pp, layout.vpp)
    check_free_space(dst, checkpoint_bytes(source.arch), "the converted checkpoint")
    return source


def convert(src: str, dst: str | Path, *, to: str = "megatron",
            layout: ParallelLayout | None = None, device: str | None = None,
            overwrite: bool = False, tokenizer: str | Path | None = None) -> Path:  # fmt: skip
    """Convert ``src`` (``gguf:FILE``, a Hugging Face folder, a megatron-prune checkpoint or a
    Megatron-LM ``--save`` folder) to a Megatron dist checkpoint written at ``layout``
    (collective over its tp*pp ranks) in the folder layout Megatron-LM's ``--load`` takes, or
    with ``to="hf"`` to a Hugging Face folder. ``tokenizer``: a Hugging Face tokenizer folder
    for a Megatron-LM source whose args name none."""
    from megatron_prune.stages.convert import to_hf, to_megatron

    layout = _layout(layout)
    source = check_convert(src, dst, to=to, layout=layout, overwrite=overwrite,
                           tokenizer=tokenizer)  # fmt: skip
    if to == "hf":
        to_hf(source, Path(dst), overwrite)
    else:
        to_megatron(source, Path(dst), layout, overwrite, device)
    return Path(dst)


def megatron_lm_args(checkpoint: str | Path) -> list[str]:
    """The Megatron-LM command-line flags that build ``checkpoint``'s model (for
    ``pretrain_gpt.py --load CHECKPOINT --finetune``); refuses models Megatron-LM's GPT
    cannot express (sandwich norms, per-layer widths, local RoPE bases)."""
    from megatron_prune.checkpoint.megatron_lm_format import megatron_lm_flags
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    return megatron_lm_flags(CheckpointMeta.read(checkpoint).arch)


def export_hf(checkpoint: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """A checkpoint as a Hugging Face folder (the family's class, or this project's remote code
    for shapes transformers' classes cannot express)."""
    return convert(str(checkpoint), dst, to="hf", overwrite=overwrite)


# ----------------------------------------------------------------------------- open a model


def open_model(checkpoint: str | Path, layout: ParallelLayout | None = None,
               device: str | None = None, compute: ComputeOptions | None = None):  # fmt: skip
    """This rank's chunks of ``checkpoint`` at ``layout`` (``LoadedModel``), computing as
    ``compute`` says (default: SDPA attention; bf16 on an accelerator, fp32 on the CPU)."""
    from megatron_prune.checkpoint.megatron_io import load_model
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.distributed import initialize, model_device

    layout = _layout(layout)
    CheckpointMeta.read(checkpoint).arch.check_layout(layout.tp, layout.pp, layout.vpp)
    compute = compute or ComputeOptions()
    accel = initialize(layout, device)
    place = model_device(accel)
    return load_model(checkpoint, sequence_parallel=layout.sequence_parallel, device=place,
                      params_dtype=compute.dtype(place),
                      attention_backend=compute.attention_backend)  # fmt: skip


# ------------------------------------------------------------------------------- evaluation


def perplexity(checkpoint: str | Path, data: str | Path, *, seq_len: int = 512,
               max_tokens: int | None = None, layout: ParallelLayout | None = None,
               device: str | None = None, compute: ComputeOptions | None = None):  # fmt: skip
    """Held-out perplexity of ``checkpoint`` on a UTF-8 text file (``PerplexityResult``)."""
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.evaluate.perplexity import perplexity as run_perplexity

    ids = check_perplexity(checkpoint, data, seq_len=seq_len, max_tokens=max_tokens,
                           layout=layout)  # fmt: skip
    tokenizer = load_tokenizer(checkpoint)
    if ids is None:
        ids = tokenizer.encode(_read_text(Path(data), "--data"))
    model = open_model(checkpoint, layout, device, compute)
    bos = tokenizer.bos_id if model.arch.needs_bos else None
    return run_perplexity(model.chunks, ids, seq_len, model.arch.vocab_size, bos, max_tokens)


def check_perplexity(checkpoint: str | Path, data: str | Path, *, seq_len: int = 512,
                     max_tokens: int | None = None,
                     layout: ParallelLayout | None = None) -> list[int] | None:  # fmt: skip
    """Every check of :func:`perplexity` that needs no weights. With sequence parallelism the
    text is tokenized here (every window, the last one too, must split over TP) and its ids
    are returned; otherwise None."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    layout = _layout(layout)
    arch = CheckpointMeta.read(checkpoint).arch
    arch.check_layout(layout.tp, layout.pp, layout.vpp)
    data = check_text(data, "--data")
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2")
    if not layout.sequence_parallel:
        return None
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.evaluate.perplexity import windows

    tokenizer = load_tokenizer(checkpoint)
    ids = tokenizer.encode(_read_text(data, "--data"))
    bos = tokenizer.bos_id if arch.needs_bos else None
    wins = list(windows(ids[:max_tokens] if max_tokens is not None else ids, seq_len, bos))
    last = wins[-1] if wins else None
    lengths = {"--seq-len": seq_len}
    if last is not None and len(last) != seq_len:
        lengths["the last window of --data (tokens left at its end; see --max-tokens)"] = len(last)
    _check_sequence_parallel(layout, lengths)
    return ids


def generate(checkpoint: str | Path, prompt: str, *, max_new_tokens: int = 32,
             layout: ParallelLayout | None = None, device: str | None = None,
             compute: ComputeOptions | None = None) -> str:  # fmt: skip
    """Greedy continuation of ``prompt`` (the prompt plus the generated text)."""
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.evaluate.generate import greedy_generate

    tokenizer = load_tokenizer(checkpoint)
    model = open_model(checkpoint, layout, device, compute)
    ids = tokenizer.encode(prompt)
    if model.arch.needs_bos and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id, *ids]
    new = greedy_generate(model.chunks, ids, max_new_tokens, model.arch.vocab_size,
                          tokenizer.eos_id)  # fmt: skip
    return prompt + tokenizer.decode(new)


# ------------------------------------------------------------------------------------ score


def check_score(checkpoint: str | Path, data: str | Path, out: str | Path, *,
                layout: ParallelLayout | None = None, resume: bool = False,
                overwrite: bool = False, seq_len: int | None = None) -> None:  # fmt: skip
    """Every check of :func:`score` that needs no weights."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta

    layout = _layout(layout)
    check_not_input(out, "--out", {"CHECKPOINT": checkpoint, "--data": data})
    if seq_len is not None:
        _check_sequence_parallel(layout, {"--seq-len": seq_len})
    meta = CheckpointMeta.read(checkpoint)
    meta.arch.check_layout(layout.tp, layout.pp, layout.vpp)
    if meta.arch.heterogeneous:
        raise UserError(
            f"{checkpoint} has per-layer widths (a heterogeneous pruned model): scoring it "
            "is not supported (scores are [layers, units] tables); prune the uniform source "
            "model with its scores instead"
        )
    check_text(data, "--data")
    check_output(Path(out), overwrite)
    partial = Path(out).with_name(Path(out).name + ".partial") / "partial.json"
    if resume and not partial.is_file():
        raise UserError(f"--resume: no partial run to continue ({partial} missing)")


def score(checkpoint: str | Path, data: str | Path, out: str | Path, *, samples: int,
          seq_len: int, metrics: list[str] | None = None, seed: int = 1234,
          micro_batches: int = 2, micro_batch_size: int = 1, save_every: int = 8,
          stop_after: int | None = None, esd_method: str = "xmin_peak", ppl_samples: int = 4,
          resume: bool = False, overwrite: bool = False, layout: ParallelLayout | None = None,
          device: str | None = None, compute: ComputeOptions | None = None) -> bool:  # fmt: skip
    """Importance scores of ``checkpoint`` from ``samples`` calibration windows of ``seq_len``
    tokens of ``data``, written to ``out``. Returns False when ``stop_after`` stopped it early
    (continue with ``resume=True``)."""
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.importance.scoring import DEFAULT_METRICS, ScoreJob, run_score_job

    layout = _layout(layout)
    check_score(checkpoint, data, out, layout=layout, resume=resume, overwrite=overwrite,
                seq_len=seq_len)  # fmt: skip
    job = ScoreJob(
        checkpoint=str(Path(checkpoint).resolve()), data=str(data), samples=samples,
        seq_len=seq_len, out=str(out), metrics=sorted(set(metrics or DEFAULT_METRICS)),
        seed=seed, micro_batches=micro_batches, micro_batch_size=micro_batch_size,
        save_every=save_every, stop_after=stop_after, esd_method=esd_method,
        ppl_samples=ppl_samples,
    )  # fmt: skip
    tokenizer = load_tokenizer(checkpoint)
    model = open_model(checkpoint, layout, device, compute)
    return run_score_job(job, model, tokenizer, layout, resume, overwrite)


# ------------------------------------------------------------------------------------- plan


def check_plan(checkpoint: str | Path, scores: str | Path | None, out: str | Path, *,
               budget: str, strategy: str = "uniform", tp: int = 1, pp: int = 1,
               prune: str | tuple[str, ...] | None = None, alpha_eps: float = 0.3,
               seq_len: int = 2048, overwrite: bool = False, data: str | Path | None = None,
               tyr=None, resume: bool = False, latency_table: str | Path | None = None,
               layout: ParallelLayout | None = None):  # fmt: skip
    """Every check of :func:`plan`; returns the checked ``PlanInputs``."""
    from megatron_prune.plan.planfile import check_plan_inputs

    check_not_input(out, "--out", {"CHECKPOINT": checkpoint, "--scores": scores, "--data": data,
                                   "--latency-table": latency_table})  # fmt: skip
    inputs = check_plan_inputs(checkpoint, scores, out, budget=budget, strategy=strategy, tp=tp,
                               pp=pp, prune=prune, alpha_eps=alpha_eps, seq_len=seq_len,
                               overwrite=overwrite, data=data, tyr=tyr, resume=resume,
                               latency_table=latency_table)  # fmt: skip
    if strategy == "tyr":  # the search loads the dense model at its layout
        layout = _layout(layout)
        inputs.source.check_layout(layout.tp, layout.pp, layout.vpp)
    return inputs


def plan(checkpoint: str | Path, scores: str | Path | None, out: str | Path, *, budget: str,
         strategy: str = "uniform", tp: int = 1, pp: int = 1,
         prune: str | tuple[str, ...] | None = None, alpha_eps: float = 0.3,
         seq_len: int = 2048, overwrite: bool = False, data: str | Path | None = None,
         tyr=None, resume: bool = False, latency_table: str | Path | None = None,
         layout: ParallelLayout | None = None, device: str | None = None):  # fmt: skip
    """Allocate ``budget`` (``"params=0.5"``: keep half of the blocks' parameters; ``flops=``,
    ``latency=`` likewise) over the layers of ``checkpoint`` with ``strategy`` (``uniform``;
    ``alpha``: AlphaPruning from the ESD alphas in ``scores``; ``tyr``: Tyr-the-Pruner's search
    on calibration text ``data``, with ``tyr`` a ``plan.tyr.job.TyrSettings``), and write the
    target ``prune`` takes to ``out``, valid at ``tp`` x ``pp``. uniform and alpha read no
    weights and need no torch.distributed; tyr searches with the dense model at ``layout``
    (default: a world of one; every rank of the layout calls this; ``device``: where) and keeps
    its supernet and search state in ``OUT.tyr/`` (``resume``: continue there).
    ``prune``: the dimensions that may shrink (default ``ffn,heads``). ``latency_table``: a
    ``bench --out`` file whose layer timings calibrate a ``latency=`` budget (analytic
    otherwise). Returns the ``Plan``."""
    from megatron_prune.plan.planfile import make_plan, write_plan

    inputs = check_plan(checkpoint, scores, out, budget=budget, strategy=strategy, tp=tp, pp=pp,
                        prune=prune, alpha_eps=alpha_eps, seq_len=seq_len,
                        overwrite=overwrite, data=data, tyr=tyr, resume=resume,
                        latency_table=latency_table, layout=layout)  # fmt: skip
    result = make_plan(inputs, layout, device)
    if strategy != "tyr" or torch.distributed.get_rank() == 0:
        write_plan(result, out)
    return result


# ------------------------------------------------------------------------------------ prune


def check_prune(checkpoint: str | Path, scores: str | Path, target: str | Path | dict[str, Any],
                out: str | Path, *, options=None, layout: ParallelLayout | None = None,
                overwrite: bool = False):  # fmt: skip
    """Every check of :func:`prune` that needs no weights; returns (meta, target, scores)."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.importance.score_files import load_scores
    from megatron_prune.plan.target import load_target
    from megatron_prune.surgery.prune import PruneOptions, check_scores

    layout = _layout(layout)
    options = options or PruneOptions()
    target_file = None if isinstance(target, dict) else target
    check_not_input(out, "--out", {"CHECKPOINT": checkpoint, "--scores": scores,
                                   "--target": target_file})  # fmt: skip
    check_output(Path(out), overwrite)
    meta = CheckpointMeta.read(checkpoint)
    if not isinstance(target, dict) and not Path(target).is_file():
        raise UserError(f"--target {target} does not exist")
    parsed = load_target(target, meta.arch, layout.tp, layout.pp)
    table = load_scores(scores, meta.arch)
    check_scores(table, meta.arch, parsed, options)
    # the pruned model is smaller: the source's size bounds it (its exact shape needs scores)
    check_free_space(out, checkpoint_bytes(meta.arch, meta.dtype), "the pruned checkpoint")
    return meta, parsed, table


def prune(checkpoint: str | Path, scores: str | Path, target: str | Path | dict[str, Any],
          out: str | Path, *, clap: bool = False, slnp: bool = False,
          absorb_post_norms: bool = False, drop_post_norms: bool = False,
          channel_score: str = "channel/l1",
          head_score: str = "head/l2", neuron_score: str = "neuron/l2",
          layer_score: str = "layer/block_influence", layout: ParallelLayout | None = None,
          device: str | None = None, overwrite: bool = False):  # fmt: skip
    """Prune ``checkpoint`` to ``target`` (a YAML file or the same mapping) using ``scores``, and
    write the pruned checkpoint to ``out`` at ``layout``: collective over its tp*pp ranks, each
    holding only its share of the pruned model. Returns the ``SurgeryPlan``."""
    from megatron_prune.distributed import initialize
    from megatron_prune.log import log
    from megatron_prune.stages.prune import broadcast_plan, write_pruned
    from megatron_prune.surgery.prune import PruneOptions, plan_surgery

    layout = _layout(layout)
    options = PruneOptions(
        clap=clap, slnp=slnp, absorb_post_norms=absorb_post_norms,
        drop_post_norms=drop_post_norms, channel_score=channel_score,
        head_score=head_score, neuron_score=neuron_score, layer_score=layer_score,
    )  # fmt: skip
    meta, parsed, table = check_prune(checkpoint, scores, target, out, options=options,
                                      layout=layout, overwrite=overwrite)  # fmt: skip
    initialize(layout, device)
    plan: object = None
    if torch.distributed.get_rank() == 0:
        try:
            plan = plan_surgery(meta.arch, table, parsed, options)
        except UserError as err:  # every rank raises it, not rank 0 alone
            plan = err
    plan = broadcast_plan(plan)
    if isinstance(plan, UserError):
        raise plan
    log(f"kept layers {plan.kept}; pruned architecture {plan.arch.to_dict()}")
    write_pruned(Path(checkpoint), meta, plan, Path(out), layout.to_dict(), options,
                 asdict(parsed), Path(scores), overwrite)  # fmt: skip
    return plan


# --------------------------------------------------------------------------------- sparsify


def check_sparsify(checkpoint: str | Path, out: str | Path, *, scores: str | Path | None = None,
                   sparsity: float = 0.5, method: str = "wanda", allocation: str = "uniform",
                   alpha_eps: float | None = None, layout: ParallelLayout | None = None,
                   overwrite: bool = False):  # fmt: skip
    """Every check of :func:`sparsify` that needs no weights; returns (meta, SparsityPlan)."""
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.importance.score_files import load_scores
    from megatron_prune.plan.strategies import DEFAULT_ALPHA_EPS
    from megatron_prune.surgery.masks import ALLOCATIONS, METHODS, plan_sparsity

    layout = _layout(layout)
    if method not in METHODS:
        raise UserError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if allocation not in ALLOCATIONS:
        raise UserError(f"--allocation {allocation!r}: use one of {', '.join(ALLOCATIONS)}")
    if scores is None and (method == "wanda" or allocation == "alpha"):
        needs = "--metrics wanda" if method == "wanda" else "--metrics esd"
        raise UserError(f"--method {method} --allocation {allocation} needs --scores DIR "
                        f"(written by `megatron-prune score CKPT ... {needs}`)")  # fmt: skip
    check_not_input(out, "--out", {"CHECKPOINT": checkpoint, "--scores": scores})
    check_output(Path(out), overwrite)
    meta = CheckpointMeta.read(checkpoint)
    meta.arch.check_layout(layout.tp, layout.pp, layout.vpp)
    table = {} if scores is None else load_scores(scores, meta.arch)
    eps = DEFAULT_ALPHA_EPS if alpha_eps is None else alpha_eps
    plan = plan_sparsity(meta.arch, table, sparsity, method, allocation, eps, scores_label=scores)
    check_free_space(out, checkpoint_bytes(meta.arch, "fp32"), "the sparsified checkpoint")
    return meta, plan


def sparsify(checkpoint: str | Path, out: str | Path, *, scores: str | Path | None = None,
             sparsity: float = 0.5, method: str = "wanda", allocation: str = "uniform",
             alpha_eps: float | None = None, layout: ParallelLayout | None = None,
             device: str | None = None, overwrite: bool = False):  # fmt: skip
    """Unstructured sparsity: zero ``sparsity`` of the weights of every block's linear layers
    (``magnitude`` or ``wanda`` masks; per-layer ratios ``uniform`` or AlphaPruning's
    ``alpha``) and write the dense-shaped, masked checkpoint to ``out`` at ``layout``, for
    ``eval``. No speed-up is claimed: zeros in dense matrices cost the same. Returns the plan."""
    from megatron_prune.distributed import initialize
    from megatron_prune.stages.sparsify import write_sparsified

    layout = _layout(layout)
    meta, plan = check_sparsify(checkpoint, out, scores=scores, sparsity=sparsity, method=method,
                                allocation=allocation, alpha_eps=alpha_eps, layout=layout,
                                overwrite=overwrite)  # fmt: skip
    initialize(layout, device)
    write_sparsified(Path(checkpoint), meta, plan, Path(out), layout.to_dict(),
                     None if scores is None else Path(scores), overwrite)  # fmt: skip
    return plan


# ---------------------------------------------------------------------------------- distill


def _same_vocabulary(teacher, student, teacher_path, student_path) -> None:
    """Full-vocabulary KD compares logits id by id: the tokenizers must be the same."""
    t, s = teacher.arch, student.arch
    same_ids = t.vocab_size == s.vocab_size and t.padded_vocab_size == s.padded_vocab_size
    files = [Path(p) / "tokenizer" / "tokenizer.json" for p in (teacher_path, student_path)]
    if all(f.is_file() for f in files):
        same_ids = same_ids and files[0].read_bytes() == files[1].read_bytes()
    if not same_ids:
        raise UserError(
            f"teacher ({t.vocab_size} tokens) and student ({s.vocab_size} tokens) do not share "
            "a tokenizer; full-vocabulary distillation needs the same one"
        )


def check_distill(student: str | Path, data: list[str], out: str | Path, *,
                  options, teacher: str | Path | None = None, loss=None,
                  eval_data: str | Path | None = None, layout: ParallelLayout | None = None,
                  world_size: int | None = None, resume: bool = False,
                  overwrite: bool = False) -> None:  # fmt: skip
    """Every check of :func:`distill` that needs no model. ``world_size`` (default: the
    current one, or tp*pp) fixes the data-parallel size the batch sizes must fit."""
    from megatron_prune.checkpoint.atomic import OutputExistsError
    from megatron_prune.checkpoint.metadata import CheckpointMeta
    from megatron_prune.data.training import parse_blend
    from megatron_prune.distill.loss_config import DistillLossConfig

    layout = _layout(layout)
    loss = loss or DistillLossConfig()
    meta = CheckpointMeta.read(student)
    meta.arch.check_layout(layout.tp, layout.pp, layout.vpp)
    if teacher is None:
        if loss.lm_weight != 1.0:
            raise UserError("no --teacher: pass --lm-weight 1 to train on the LM loss alone")
    else:
        teacher_meta = CheckpointMeta.read(teacher)
        teacher_meta.arch.check_layout(layout.tp, layout.pp, layout.vpp)
        _same_vocabulary(teacher_meta, meta, teacher, student)
    if options.train_tokens < 1 or options.seq_len < 2:
        raise UserError("--train-tokens must be >= 1 and --seq-len >= 2")
    _check_sequence_parallel(layout, {"--seq-len": options.seq_len})
    if world_size is None:
        dist = torch.distributed
        world_size = dist.get_world_size() if dist.is_initialized() else layout.model_parallel_size
    dp = max(world_size // layout.model_parallel_size, 1)
    if options.global_batch % (options.micro_batch * dp):
        raise UserError(
            f"--global-batch {options.global_batch} must be a multiple of --micro-batch "
            f"{options.micro_batch} x data-parallel size {dp}"
        )
    if layout.vpp and (options.global_batch // (options.micro_batch * dp)) % layout.pp:
        raise UserError(
            "an interleaved pipeline needs micro-batches per step to be a multiple of --pp "
            f"({layout.pp}); raise --global-batch"
        )
    prefixes, _ = parse_blend(list(data))
    if eval_data:
        check_text(eval_data, "--eval-data")
    check_not_input(out, "--out", {
        "--student": student, "--teacher": teacher, "--eval-data": eval_data,
        "--data": [p + ext for p in prefixes for ext in (".bin", ".idx")],
    })  # fmt: skip
    out = Path(out).resolve()
    check_writable(out)
    check_unlocked(out)
    if out.exists() and not (resume or overwrite):
        raise OutputExistsError(out)
    if not resume:  # "auto" is fp32 or bf16 by device, unknown here: the larger estimate
        precisions = ("fp32", "bf16") if options.precision == "auto" else (options.precision,)
        need = max(training_run_bytes(meta.arch, p, options.keep_checkpoints) for p in precisions)
        check_free_space(out, need, "the distillation run (student and training checkpoints)")
    looks_like_run = (out / "metrics.jsonl").exists() or (out / "checkpoints").exists()
    if overwrite and out.is_dir() and any(out.iterdir()) and not looks_like_run:
        raise UserError(
            f"--overwrite would delete {out}, which is not a distill run folder "
            "(no metrics.jsonl or checkpoints/): choose another --out"
        )


def distill(student: str | Path, data: list[str], out: str | Path, *,
            options, teacher: str | Path | None = None, loss=None,
            eval_data: str | Path | None = None, layout: ParallelLayout | None = None,
            device: str | None = None, resume: bool = False,
            overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    """Online full-vocabulary distillation of ``teacher`` into ``student`` on the indexed
    datasets ``data`` (``[PREFIX]`` or a Megatron-LM blend ``[W1, PREFIX1, ...]``), teacher and
    student at one ``layout``; ``options`` a ``TrainOptions`` (tokens, batch, optimiser,
    logging), ``loss`` a ``DistillLossConfig`` (default: forward KL at T=1). Writes
    ``out/student`` (a checkpoint every command and Megatron-LM's ``--load`` take),
    ``out/checkpoints/step_N`` and ``out/metrics.jsonl``; returns the last metrics.
    Collective over the world (data parallelism is what tp*pp leaves)."""
    import shutil

    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.data.training import parse_blend
    from megatron_prune.distill.loss_config import DistillLossConfig
    from megatron_prune.distill.trainer import options_dict, resolve_precision, setup_run, train
    from megatron_prune.distributed import initialize, model_device
    from megatron_prune.log import is_rank0, log

    layout = _layout(layout)
    loss = loss or DistillLossConfig()
    accel = initialize(layout, device, seed=options.seed)
    check_distill(student, data, out, teacher=teacher, loss=loss, options=options,
                  eval_data=eval_data, layout=layout, resume=resume,
                  overwrite=overwrite)  # fmt: skip
    place = model_device(accel)
    options = resolve_precision(options, place)
    out = Path(out)
    if overwrite and out.exists() and is_rank0():
        shutil.rmtree(out)
    torch.distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    eval_ids = None
    if eval_data:
        eval_ids = load_tokenizer(student).encode(_read_text(Path(eval_data), "--eval-data"))
    run_config = {**options_dict(options, loss), "teacher": str(teacher) if teacher else None,
                  "student": str(student), "data": list(data)}  # fmt: skip
    log(f"distilling {options.steps} steps of {options.tokens_per_step} tokens at "
        f"TP={layout.tp} PP={layout.pp} VPP={layout.vpp} SP={layout.sequence_parallel} "
        f"DP={torch.distributed.get_world_size() // layout.model_parallel_size}")  # fmt: skip
    job = setup_run(
        Path(teacher) if teacher else None, Path(student), parse_blend(list(data)), out,
        layout, place, options,
    )  # fmt: skip
    state = train(job, out, loss, options, eval_ids, resume, run_config)
    return {"steps": state.step, **state.history[-1], "student": str(out / "student")}


# ------------------------------------------------------------------------------- data build


def check_build_dataset(tokenizer_checkpoint: str | Path, input: str | Path,
                        output: str | Path, *, overwrite: bool = False) -> None:  # fmt: skip
    """Every check of :func:`build_dataset` that reads no text."""
    from megatron_prune.checkpoint.atomic import OutputExistsError
    from megatron_prune.data.tokenizer import load_tokenizer

    if not Path(input).is_file():
        raise UserError(f"--input {input} does not exist")
    for ext in (".bin", ".idx"):
        check_not_input(str(output) + ext, "--output",
                        {"--input": input, "--tokenizer": tokenizer_checkpoint})  # fmt: skip
        if Path(str(output) + ext).exists() and not overwrite:
            raise OutputExistsError(Path(str(output) + ext))
        check_writable(str(output) + ext)
    check_unlocked(output)
    load_tokenizer(tokenizer_checkpoint)  # fails early if the checkpoint has none


def build_dataset(tokenizer_checkpoint: str | Path, input: str | Path, output: str | Path, *,
                  json_key: str = "text", overwrite: bool = False):  # fmt: skip
    """Text (blank lines separate documents) or JSONL to a Megatron indexed dataset
    (``output.bin`` / ``output.idx``) with a checkpoint's tokenizer (``BuildReport``)."""
    from megatron_prune.data.indexed import build_indexed_dataset
    from megatron_prune.data.tokenizer import load_tokenizer

    check_build_dataset(tokenizer_checkpoint, input, output, overwrite=overwrite)
    return build_indexed_dataset(load_tokenizer(tokenizer_checkpoint), Path(input),
                                 Path(output), json_key)  # fmt: skip


# ------------------------------------------------------------------------------------ bench


def check_bench(checkpoints: list[str | Path] = (), shapes: list[str] = (), *,
                options=None, precision: str = "auto", attention_backend: str = "auto",
                layout: ParallelLayout | None = None, out: str | Path | None = None,
                overwrite: bool = False) -> list:  # fmt: skip
    """Every check of :func:`bench` that builds no model; returns the ``ModelSpec`` list."""
    from megatron_prune.bench.measure import BenchOptions
    from megatron_prune.bench.run import check_options, model_specs
    from megatron_prune.compute import ComputeOptions

    layout = _layout(layout)
    ComputeOptions(attention_backend=attention_backend, precision=precision)
    specs = model_specs([str(c) for c in checkpoints], list(shapes))
    check_options(specs, options or BenchOptions(), layout)
    if out is not None:
        check_output(Path(out), overwrite)
    return specs


def bench(checkpoints: list[str | Path] = (), shapes: list[str] = (), *, options=None,
          precision: str = "auto", attention_backend: str = "auto",
          peak_tflops: float | None = None, layout: ParallelLayout | None = None,
          device: str | None = None, out: str | Path | None = None,
          overwrite: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """Time each model (checkpoint folders, then random weights of each ``shapes`` entry: a
    name from ``models.shapes.SHAPES`` or an arch YAML) at ``layout``: prefill, KV-cache decode
    and training-step tokens/s, TFLOP/s and MFU (``options``: a ``bench.options.BenchOptions``).
    The first model is the reference of every ratio. ``precision`` auto: bf16 on an
    accelerator, fp32 on the CPU (or bf16, fp16, fp32); ``peak_tflops`` overrides the device's
    table entry. Returns one record per model (schema: :mod:`megatron_prune.bench.report`);
    ``out`` gets them as JSON lines.
    Collective over the world."""
    import json

    from megatron_prune.bench.measure import BenchOptions
    from megatron_prune.bench.report import add_comparison
    from megatron_prune.bench.run import bench_model, build, free
    from megatron_prune.checkpoint.atomic import is_writer, write_text_atomic
    from megatron_prune.compute import ComputeOptions
    from megatron_prune.distributed import initialize, model_device
    from megatron_prune.log import log

    layout = _layout(layout)
    options = options or BenchOptions()
    specs = check_bench(checkpoints, shapes, options=options, precision=precision,
                        attention_backend=attention_backend, layout=layout, out=out,
                        overwrite=overwrite)  # fmt: skip
    accel = initialize(layout, device)
    place = model_device(accel)
    torch_dtype = ComputeOptions(precision=precision).dtype(place)
    records = []
    for spec in specs:
        log(f"bench {spec.name} ({spec.source}, {torch_dtype}, {attention_backend})")
        chunks = build(spec, layout, torch_dtype, place, attention_backend)
        records.append(bench_model(spec, chunks, layout, options, torch_dtype,
                                   attention_backend, peak_tflops))  # fmt: skip
        free(chunks)
    add_comparison(records, options.phases)
    if out is not None and is_writer():
        write_text_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in records))
    return records


# ----------------------------------------------------------------------------------- report


def check_report(dirs: list[str | Path], out: str | Path, *, overwrite: bool = False):
    """Every check of :func:`report`; returns what was found (``RunContents``)."""
    from megatron_prune.report.collect import collect

    if not dirs:
        raise UserError("report: name at least one run folder")
    check_output(Path(out), overwrite)
    found = collect(dirs, exclude=Path(out))
    if found.empty:
        raise UserError(
            f"report: found no megatron-prune outputs under {', '.join(map(str, dirs))} "
            "(checkpoints, score folders, plans, distillation runs, `eval --out` results)"
        )
    return found


def report(dirs: list[str | Path], out: str | Path, *, overwrite: bool = False) -> Path:
    """A markdown report (``out/report.md``) with PNG plots from finished run folders ``dirs``:
    perplexity vs parameters, kept widths per layer, importance heatmaps, distillation curves
    and the plan; it says which of these the folders had nothing for. Reads metadata, score
    tables and metrics only (no model, no torch.distributed). Returns the report's path."""
    from megatron_prune.checkpoint.atomic import atomic_directory
    from megatron_prune.report.markdown import REPORT_FILE, write_report

    found = check_report(dirs, out, overwrite=overwrite)
    with atomic_directory(out, overwrite) as scratch:
        write_report(found, scratch)
    return Path(out) / REPORT_FILE
