"""The ``score`` job: calibration forward passes with hooks, then score files.

Output folder (written as ``OUT.partial`` and renamed when complete)::

    scores.safetensors   every score, global index space, the same names at every layout
    meta.json            metrics, layout, tokens seen, checkpoint, data hash, settings

While running, ``OUT.partial`` also holds ``partial.safetensors`` + ``partial.json``: the
world-wide sums after the last finished round, from which ``--resume`` continues.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state
from safetensors.torch import load_file, save_file

from megatron_prune.checkpoint.atomic import (
    OutputExistsError,
    publish_directory,
    replace_atomic,
    write_text_atomic,
)
from megatron_prune.errors import ScoreError
from megatron_prune.evaluate.perplexity import window_nll_sum
from megatron_prune.importance.calibration import file_sha256, packed_samples
from megatron_prune.importance.esd import MATRICES, esd_alpha, gram_eigenvalues, layer_matrices
from megatron_prune.importance.finalize import finalize
from megatron_prune.importance.hooks import ImportanceHooks, RankView, all_reduce_sum
from megatron_prune.importance.metrics import ALL_METRICS, DEFAULT_METRICS
from megatron_prune.importance.score_files import (  # noqa: F401 (load_scores: re-exported)
    FORMAT_VERSION,
    META_FILE,
    SCORES_FILE,
    load_scores,
)
from megatron_prune.log import is_rank0, log
from megatron_prune.models.arch import ModelArch

PARTIAL_FILE, PARTIAL_META = "partial.safetensors", "partial.json"


@dataclass
class ScoreJob:
    checkpoint: str
    data: str
    samples: int
    seq_len: int
    out: str
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    seed: int = 1234
    micro_batches: int = 2  # micro-batches per forward call per data-parallel rank
    micro_batch_size: int = 1  # samples per micro-batch (4+ keeps a GPU busy)
    save_every: int = 8  # rounds between partial saves
    stop_after: int | None = None  # samples in this run, then save and stop
    esd_method: str = "xmin_peak"
    ppl_samples: int = 4

    def identity(self) -> dict:
        """What must match for --resume to continue a partial run."""
        keys = ("checkpoint", "samples", "seq_len", "metrics", "seed")
        return {k: getattr(self, k) for k in keys}


def _barrier() -> None:
    torch.distributed.barrier()


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    replace_atomic(path, lambda tmp: save_file(contiguous, str(tmp)))


def prepare_output(job: ScoreJob, resume: bool, overwrite: bool) -> tuple[Path, int, dict]:
    """(scratch dir, samples already done, sums so far). Collective."""
    out = Path(job.out)
    scratch = out.with_name(out.name + ".partial")
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    done, sums = 0, {}
    if resume:
        meta_path = scratch / PARTIAL_META
        if not meta_path.is_file():
            raise ScoreError(f"--resume: no partial run in {scratch}")
        partial = json.loads(meta_path.read_text())
        if partial["job"] != job.identity() or partial["data_sha256"] != file_sha256(
            Path(job.data)
        ):
            raise ScoreError(
                f"--resume: the partial run in {scratch} was started with other settings, data "
                f"or checkpoint ({partial['job']}); start afresh without --resume"
            )
        done = partial["samples_done"]
        sums = load_file(str(scratch / PARTIAL_FILE))
    elif is_rank0():
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    _barrier()
    return scratch, done, sums


def layer_ppl(
    chunks, arch: ModelArch, samples: torch.Tensor, view, device: torch.device
) -> dict[str, torch.Tensor]:
    """Perplexity with each layer removed (and the base), ShortGPT's ppl-based importance."""
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), view.dp_rank
    mine = samples[dp_rank::dp]
    tokens = samples.shape[0] * (samples.shape[1] - 1)
    layers = {layer.layer_number - 1: layer for c in chunks for layer in c.decoder.layers}

    def ppl() -> float:
        nll = torch.zeros(1, dtype=torch.float64)
        for row in mine:
            nll += window_nll_sum(chunks, row.tolist(), arch.vocab_size)
        nll = all_reduce_sum(nll, device, group=parallel_state.get_data_parallel_group())
        return float(torch.exp(nll / tokens))

    def skip(_m, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        return (h_in, output[1]) if isinstance(output, tuple) else h_in

    base = ppl()
    without = torch.zeros(arch.num_layers)
    for i in range(arch.num_layers):
        handle = layers[i].register_forward_hook(skip, with_kwargs=True) if i in layers else None
        without[i] = ppl()
        if handle is not None:
            handle.remove()
    return {"layer/ppl_without": without, "layer/ppl_increase": without - base}


def esd_scores(
    chunks, arch: ModelArch, view, method: str, device: torch.device
) -> dict[str, torch.Tensor]:
    alphas = torch.zeros(arch.num_layers, len(MATRICES), dtype=torch.float64)
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            for j, (name, (w, split_rows)) in enumerate(layer_matrices(layer, arch).items()):
                assert name == MATRICES[j]
                eigs = gram_eigenvalues(w, split_rows, view.tp_group)
                if view.tp_rank == 0 and view.dp_rank == 0:  # one contribution per layer
                    alphas[layer.layer_number - 1, j] = esd_alpha(eigs.cpu(), method)
    alphas = all_reduce_sum(alphas, device, group=torch.distributed.group.WORLD)
    return {"esd/alpha": alphas.float(), "esd/block_alpha": alphas.mean(1).float()}


def run_score_job(job: ScoreJob, model, tokenizer, layout, resume: bool, overwrite: bool) -> bool:
    """Score ``model`` (already loaded at ``layout``). Returns False if stopped early (the sums
    so far are saved in ``OUT.partial`` for ``--resume``)."""
    arch: ModelArch = model.arch
    metrics = set(job.metrics)
    unknown = metrics - set(ALL_METRICS)
    if unknown:
        raise ScoreError(f"unknown metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
    bos = tokenizer.bos_id if arch.needs_bos else None
    text = Path(job.data).read_text(encoding="utf-8")
    samples = packed_samples(tokenizer.encode(text), job.samples, job.seq_len, job.seed, bos)
    scratch, done, loaded = prepare_output(job, resume, overwrite)
    view = RankView.current(layout.sequence_parallel)
    hooks = ImportanceHooks(model.chunks, arch, metrics, view, seq_len=job.seq_len)
    if loaded and torch.distributed.get_rank() == 0:
        hooks.sums.load(loaded)  # the world's sums so far live on one rank only

    started = time.perf_counter()
    done = _calibrate(job, model.chunks, hooks, samples, view, scratch, done)
    elapsed = time.perf_counter() - started
    hooks.remove()
    if done < job.samples:
        _save_partial(job, hooks, scratch, done)
        log(f"stopped after {done}/{job.samples} samples; rerun with --resume to continue")
        return False
    scores = _final_scores(job, model.chunks, arch, hooks, samples, view)
    if is_rank0():
        _write_scores(job, scratch, scores, arch, layout, elapsed)
    _barrier()
    log(f"wrote {job.out}")
    return True


def _save_partial(job: ScoreJob, hooks: ImportanceHooks, scratch: Path, done: int) -> None:
    """Collective: the world's sums after ``done`` samples, for ``--resume``."""
    sums = hooks.sums.all_reduced()
    if is_rank0():
        _save_tensors(scratch / PARTIAL_FILE, sums)
        partial = {"job": job.identity(), "samples_done": done,
                   "data_sha256": file_sha256(Path(job.data))}  # fmt: skip
        _write_json(scratch / PARTIAL_META, partial)
    _barrier()


def _calibrate(job: ScoreJob, chunks, hooks: ImportanceHooks, samples: torch.Tensor,
               view: RankView, scratch: Path, done: int) -> int:  # fmt: skip
    """Forward this data-parallel rank's share of samples ``done..`` through the hooked model,
    round by round, saving partial sums every ``save_every`` rounds; returns samples done."""
    from megatron_prune.evaluate.forward import forward_reduce
    from megatron_prune.progress import TokenCounter

    dp = parallel_state.get_data_parallel_world_size()
    per_rank = job.micro_batches * job.micro_batch_size  # samples per rank per round
    per_round = dp * per_rank
    limit = job.samples if job.stop_after is None else min(job.samples, done + job.stop_after)
    log(f"scoring {limit - done} samples x {job.seq_len} tokens ({sorted(job.metrics)})")
    bar = TokenCounter((limit - done) * job.seq_len, desc="score")
    for k, start in enumerate(range(done, limit, per_round), 1):
        first = start + view.dp_rank * per_rank
        mine = samples[first : min(first + per_rank, limit)]
        whole = len(mine) - len(mine) % job.micro_batch_size
        for part, mbs in ((mine[:whole], job.micro_batch_size), (mine[whole:], 1)):
            if len(part):
                forward_reduce(chunks, part, lambda lg: torch.zeros(len(lg)), mbs)
        hooks.sums.flush()
        bar.update((min(start + per_round, limit) - done) * job.seq_len)
        done = min(start + per_round, limit)
        if k % job.save_every == 0 and done < limit:
            _save_partial(job, hooks, scratch, done)
    bar.close()
    return done


def _final_scores(job: ScoreJob, chunks, arch: ModelArch, hooks: ImportanceHooks,
                  samples: torch.Tensor, view: RankView) -> dict[str, torch.Tensor]:  # fmt: skip
    """Collective: activation scores from the world's sums, plus the weight-only (ESD) and
    layer-removal (layer_ppl) metrics when asked for."""
    hooks.add_weight_stats(chunks)
    scores = finalize(hooks.sums.all_reduced(), arch, tokens=job.samples * job.seq_len)
    if "esd" in job.metrics:
        scores.update(esd_scores(chunks, arch, view, job.esd_method, hooks.sums.device))
    if "layer_ppl" in job.metrics:
        scores.update(layer_ppl(chunks, arch, samples[: job.ppl_samples], view,
                                hooks.sums.device))  # fmt: skip
    return scores


def _write_scores(job: ScoreJob, scratch: Path, scores: dict[str, torch.Tensor],
                  arch: ModelArch, layout, elapsed: float) -> None:  # fmt: skip
    """Rank 0: the score files, then ``OUT.partial`` becomes ``OUT``."""
    _save_tensors(scratch / SCORES_FILE, scores)
    _write_json(scratch / META_FILE, {
        "format_version": FORMAT_VERSION,
        "arch": arch.to_dict(),
        "job": asdict(job),
        "layout": {**layout.to_dict(), "dp": parallel_state.get_data_parallel_world_size()},
        "tokens": job.samples * job.seq_len,
        "data_sha256": file_sha256(Path(job.data)),
        "calibration_seconds": elapsed,
        "scores": sorted(scores),
    })  # fmt: skip
    for name in (PARTIAL_FILE, PARTIAL_META):
        (scratch / name).unlink(missing_ok=True)
    publish_directory(scratch, Path(job.out))
