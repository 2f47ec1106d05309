"""``plan --strategy tyr``: calibration statistics, the supernet, and the search, on the dense
model at the run's layout (TP x PP x DP; a world of one by default; :mod:`ranks` says where
each part of the work lives).

1. The uniform plan is the start, so the budget holds before the search and (every move being
   budget-neutral) after it.
2. X^T X of every layer's ``linear_proj`` and ``linear_fc2`` inputs, summed in fp64 over the
   calibration windows (the importance hooks' :class:`Sums`). With expectation error
   accumulation, layer l's statistics come from a model whose earlier layers already hold their
   *expected* pruned weights (the mean of the variants the search may pick around the start,
   which is what the mean output of those variants is: the two weights are linear in the
   output); without it, from the dense model in one pass.
3. Greedy OBS removal orders and refit variants per layer (:mod:`supernet`).
4. The search (:mod:`search`): fitness is the mean per-token KL(dense || candidate) of the
   first n calibration windows, computed by the project's vocab-parallel KL
   (:func:`megatron_prune.distill.kl.vocab_parallel_kl`) on logits of the dense-shaped model
   with the candidate's variants swapped in. The dense logits of the largest stage's windows
   are computed once and kept on the CPU (tokens x padded vocabulary x 4 bytes).

The work folder (``PLAN.tyr/``) holds the supernet and the search state; ``resume`` continues
from it when the settings match.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_prune.errors import UserError
from megatron_prune.plan.cost import Budget
from megatron_prune.plan.tyr.ranks import SearchRanks
from megatron_prune.plan.tyr.search import Allocation, SearchConfig, Space, coarse_step, evolve
from megatron_prune.plan.tyr.supernet import LOCAL_PRUNERS, Supernet

TYR_DIMS = ("ffn", "heads")
SCORE_NAMES = {"head": "head/l2", "neuron": "neuron/l2"}  # prune's default unit scores


@dataclass(frozen=True)
class TyrSettings:
    """The search's cost knobs (defaults: about a minute on a tiny model on a CPU)."""

    samples: int = 8  # calibration windows for the statistics; the search uses the first ones
    seq_len: int = 128
    seed: int = 0
    iterations: int = 3
    generations: int = 6
    offspring: int = 8
    stages: tuple[tuple[int, int], ...] = ((1, 4), (2, 2), (4, 1))  # (windows, survivors)
    step: float = 0.125  # the first iteration's move, as a fraction of the source width
    max_sparsity: float = 0.875  # no layer's module loses more than this
    error_accumulation: bool = True
    expectation_levels: int = 2  # variants each side of the start averaged for expectations
    refit: bool = True
    local_pruner: str = "obs"  # obs: greedy OBS; scores: the units prune keeps by --scores

    def check(self) -> None:
        ints = {"--tyr-samples": self.samples, "--tyr-seq-len": self.seq_len,
                "--tyr-iterations": self.iterations, "--tyr-generations": self.generations,
                "--tyr-offspring": self.offspring}  # fmt: skip
        for flag, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise UserError(f"{flag} {value!r}: must be a positive integer")
        if self.seq_len < 2:
            raise UserError(f"--tyr-seq-len {self.seq_len}: must be at least 2")
        windows = [n for n, _ in self.stages]
        if not self.stages or windows != sorted(windows) or max(windows) > self.samples or (
                min(windows) < 1 or any(k < 1 for _, k in self.stages)):  # fmt: skip
            raise UserError(f"--tyr-stages {self.stages}: give growing window counts, each at "
                            f"most --tyr-samples {self.samples}, with survivors >= 1")  # fmt: skip
        if not 0 < self.step < 1 or not 0 < self.max_sparsity < 1:
            raise UserError("--tyr-step and --tyr-max-sparsity must be in (0, 1)")
        if self.local_pruner not in LOCAL_PRUNERS:
            raise UserError(f"--tyr-local-pruner {self.local_pruner!r}: choose one of "
                            f"{LOCAL_PRUNERS}")  # fmt: skip


def parse_stages(text: str) -> tuple[tuple[int, int], ...]:
    """``"1:4,2:2,4:1"`` -> ((1, 4), (2, 2), (4, 1)): windows:survivors per selection stage."""
    try:
        pairs = [part.split(":") for part in text.split(",") if part.strip()]
        return tuple((int(a), int(b)) for a, b in pairs)
    except ValueError:
        raise UserError(
            f"--tyr-stages {text!r}: write WINDOWS:SURVIVORS,... e.g. 1:4,2:2,4:1"
        ) from None


@dataclass(frozen=True)
class Grids:
    """Per module type, the valid widths (ascending, equally spaced) at the target layout."""

    attn: tuple[int, ...]
    ffn: tuple[int, ...]

    def widths(self, alloc: Allocation) -> dict[str, list[int]]:
        return {"num_attention_heads": [self.attn[k] for k in alloc["attn"]],
                "ffn_hidden_size": [self.ffn[k] for k in alloc["ffn"]]}  # fmt: skip


def search_space(source, grid, dims, start: dict, budget: Budget, max_sparsity: float):
    """(Grids, start allocation, Space) from the uniform plan ``start`` and the grid."""
    g = source.num_query_groups
    grids = Grids(tuple(n for n, gg in grid.heads if gg == g), tuple(grid.ffn))
    L = source.num_layers
    first = {"attn": grids.attn.index(start["num_attention_heads"]),
             "ffn": grids.ffn.index(start["ffn_hidden_size"])}  # fmt: skip
    alloc = {k: (v,) * L for k, v in first.items()}
    sources = {"attn": source.num_attention_heads, "ffn": source.ffn_hidden_size}
    low, high = {}, {}
    for kind, values in (("attn", grids.attn), ("ffn", grids.ffn)):
        moves = ("heads" if kind == "attn" else "ffn") in dims
        floor = (1 - max_sparsity) * sources[kind]
        lo = next((k for k, v in enumerate(values) if v >= floor), 0) if moves else first[kind]
        hi = len(values) - 1 if moves else first[kind]
        low[kind], high[kind] = (min(lo, first[kind]),) * L, (hi,) * L
    mixed = source.sliding_window is not None and len({source.is_local_layer(i)
                                                       for i in range(L)}) > 1  # fmt: skip
    attn_classes = tuple(int(source.is_local_layer(i)) if mixed and budget.metric != "params"
                         else 0 for i in range(L))  # fmt: skip
    space = Space(low, high, {"attn": attn_classes, "ffn": (0,) * L})
    return grids, alloc, space


# ------------------------------------------------------------------------------ on the model


def _layers(model) -> dict[int, torch.nn.Module]:
    return {layer.layer_number - 1: layer for c in model.chunks for layer in c.decoder.layers}


def collect_grams(model, windows: torch.Tensor, layers: list[int],
                  ranks: SearchRanks) -> dict[str, torch.Tensor]:  # fmt: skip
    """fp64 X^T X of the proj and fc2 inputs of ``layers`` over ``windows`` (this DP replica's
    share of the calibration windows), on each layer's owner only (collective over the world).

    A row-parallel input is sharded over TP by columns; each TP rank gathers the whole input and
    adds its own block of rows (its columns against all), so the owner's sum is the Gram the
    unsplit model gives."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region as gather

    from megatron_prune.evaluate.forward import forward_reduce
    from megatron_prune.importance.hooks import Sums

    arch = model.arch
    local = _layers(model)
    widths = {"proj": arch.num_attention_heads * arch.head_dim, "fc2": arch.ffn_hidden_size}
    mine = [i for i in layers if i in local]
    shapes = {f"{kind}.{i}": (c // ranks.tp, c) for i in mine for kind, c in widths.items()}
    sums = Sums(shapes, ranks.device)

    def hook(name: str):
        def add(_m, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            whole = x if ranks.tp == 1 else gather(x)  # [tokens, c]: every column
            sums.add(name, (slice(None),), x.t() @ whole)

        return add

    handles = []
    for i in mine:
        layer = local[i]
        handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
            hook(f"proj.{i}")))  # fmt: skip
        handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(hook(f"fc2.{i}")))
    try:
        for row in windows:
            forward_reduce(model.chunks, row[None], lambda lg: lg.new_zeros(lg.shape[0]))
            sums.flush()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i in layers:
        for kind, c in widths.items():
            name = f"{kind}.{i}"
            block = None
            if name in sums.tensors:
                block = torch.zeros(c, c, dtype=torch.float64, device=ranks.device)
                block[ranks.columns(c)] = sums.tensors[name]
            total = ranks.reduce_to_owner(i, block, (c, c))
            if total is not None:
                out[name] = total
    return out


class Evaluator:
    """Sets a candidate's variants into this rank's layers and measures KL(dense || candidate)
    over the first n calibration windows, each DP replica computing its share."""

    def __init__(self, model, supernet: Supernet, grids: Grids, windows: torch.Tensor,
                 ranks: SearchRanks) -> None:  # fmt: skip
        from megatron.core import parallel_state

        from megatron_prune.evaluate.forward import forward_reduce

        self.model, self.supernet, self.grids, self.ranks = model, supernet, grids, ranks
        self.layers = _layers(model)
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.dense = {i: (layer.self_attention.linear_proj.weight.detach().clone(),
                          layer.mlp.linear_fc2.weight.detach().clone())
                      for i, layer in self.layers.items()}  # fmt: skip
        self.mine = ranks.my_windows(len(windows))
        self.windows = windows[self.mine]
        self.logits = torch.empty(0)
        if self.mine:
            with torch.no_grad():
                self.logits = forward_reduce(model.chunks, self.windows,
                                             lambda lg: lg.float().cpu())  # fmt: skip
        self.calls = 0

    def dense_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s whole dense proj and fc2 weights (a TP collective on its stage)."""
        return tuple(self.ranks.gather_columns(w) for w in self.dense[i])

    def set_weights(self, i: int, proj: torch.Tensor, fc2: torch.Tensor) -> None:
        """Layer ``i`` computes with the whole weights ``proj`` and ``fc2`` (this rank keeps its
        TP shard of their input columns)."""
        layer = self.layers[i]
        with torch.no_grad():
            for module, whole in ((layer.self_attention.linear_proj, proj),
                                  (layer.mlp.linear_fc2, fc2)):  # fmt: skip
                module.weight.copy_(whole[:, self.ranks.columns(whole.shape[1])])

    def restore(self) -> None:
        for i, (proj, fc2) in self.dense.items():
            with torch.no_grad():
                self.layers[i].self_attention.linear_proj.weight.copy_(proj)
                self.layers[i].mlp.linear_fc2.weight.copy_(fc2)

    def apply(self, alloc: Allocation) -> None:
        widths = self.grids.widths(alloc)
        for i in self.layers:
            self.set_weights(i, self.supernet.weight(i, "attn", widths["num_attention_heads"][i]),
                             self.supernet.weight(i, "ffn", widths["ffn_hidden_size"][i]))

    def __call__(self, alloc: Allocation, windows: int) -> float:
        from megatron_prune.distill.kl import vocab_parallel_kl
        from megatron_prune.evaluate.forward import forward_reduce, vocab_shard_range

        self.apply(alloc)
        self.calls += 1
        arch = self.model.arch
        mine = [k for k, w in enumerate(self.mine) if w < windows]  # rows of self.windows
        calls = itertools.count()

        def kl(logits: torch.Tensor) -> torch.Tensor:
            # an interleaved pipeline pads short batches with repeats of the last row
            row = mine[min(next(calls), len(mine) - 1)]
            dense = self.logits[row][None].to(logits.device)
            start, _ = vocab_shard_range(logits.shape[-1] * self.ranks.tp)  # padding is masked
            per_token = vocab_parallel_kl(logits.float(), dense, group=self.group,
                                          vocab_start=start, vocab_size=arch.vocab_size)
            return per_token.double().mean().reshape(1).cpu()

        per_window = torch.zeros(windows, dtype=torch.float64)
        if mine:
            with torch.no_grad():
                values = forward_reduce(self.model.chunks, self.windows[mine], kl)
            per_window[[self.mine[k] for k in mine]] = values.double()
        per_window = self.ranks.sum_over_dp(per_window)
        return self.ranks.agree(float(per_window.mean()))


def build_supernet(model, supernet: Supernet, grids: Grids, space: Space, start: Allocation,
                   windows: torch.Tensor, settings: TyrSettings, evaluator: Evaluator,
                   steps: dict[str, int]) -> None:  # fmt: skip
    """Statistics and removal orders of every layer (skipping layers already on disk), with or
    without expectation error accumulation; leaves the model dense. Collective: ``windows``
    are this DP replica's share of the calibration windows."""
    arch, ranks = model.arch, evaluator.ranks
    L = arch.num_layers
    min_heads = grids.attn[min(space.low["attn"])]
    min_ffn = grids.ffn[min(space.low["ffn"])]
    todo = [i for i in range(L) if not supernet.has_layer(i)]
    ranks.barrier()  # every rank has read what is on disk before an owner writes more

    def add(i: int, grams: dict[str, torch.Tensor]) -> None:
        if i not in evaluator.layers:
            return
        proj, fc2 = evaluator.dense_weights(i)  # every rank of the stage takes part
        if ranks.rank == ranks.owners[i]:
            supernet.add_layer(i, proj, fc2, grams[f"proj.{i}"], grams[f"fc2.{i}"],
                               min_heads=min_heads, min_ffn=min_ffn)  # fmt: skip

    if not settings.error_accumulation:
        if todo:
            grams = collect_grams(model, windows, todo, ranks)
            for i in todo:
                add(i, grams)
        ranks.barrier()
        return
    for i in range(L):
        if i in todo:
            add(i, collect_grams(model, windows, [i], ranks))
        ranks.barrier()  # the owner's files are on disk for the stage's other ranks
        if i not in evaluator.layers:
            continue
        expected = []
        for kind, grid in (("attn", grids.attn), ("ffn", grids.ffn)):
            k0, s, m = start[kind][i], steps.get(kind, 1), settings.expectation_levels
            ks = sorted({min(max(k0 + j * s, space.low[kind][i]), space.high[kind][i])
                         for j in range(-m, m + 1)})  # fmt: skip
            ws = [supernet.weight(i, kind, grid[k]).double() for k in ks]
            expected.append(torch.stack(ws).mean(0))
        evaluator.set_weights(i, *expected)
    evaluator.restore()


def _fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_tyr(inputs, settings: TyrSettings, data: Path, workdir: Path, resume: bool,
            layout=None, device: str | None = None) -> tuple[dict, dict]:  # fmt: skip
    """The target (per-layer widths) and the search record, on every rank of ``layout`` (a
    ``ParallelLayout``; default: a world of one). ``inputs``: checked PlanInputs."""
    from megatron_prune import api
    from megatron_prune.data.tokenizer import load_tokenizer
    from megatron_prune.distributed import ParallelLayout
    from megatron_prune.importance.calibration import file_sha256, packed_samples
    from megatron_prune.log import log
    from megatron_prune.plan import strategies

    started = time.perf_counter()
    layout = layout or ParallelLayout()
    source = inputs.source
    start_target = strategies.uniform(source, inputs.budget, inputs.dims, inputs.tp, inputs.pp,
                                      inputs.seq_len)  # fmt: skip
    grid = strategies.make_grid(source, inputs.dims, inputs.tp, inputs.pp)
    grids, start, space = search_space(source, grid, inputs.dims, start_target, inputs.budget,
                                       settings.max_sparsity)  # fmt: skip
    steps = {"attn": coarse_step(grids.attn, source.num_attention_heads, settings.step),
             "ffn": coarse_step(grids.ffn, source.ffn_hidden_size, settings.step)}  # fmt: skip
    config = SearchConfig(settings.seed, settings.iterations, settings.generations,
                          settings.offspring, steps, settings.stages)  # fmt: skip
    identity = {"checkpoint": inputs.paths.get("checkpoint"), "data": file_sha256(Path(data)),
                "settings": asdict(settings), "budget": str(inputs.budget), "tp": inputs.tp,
                "pp": inputs.pp, "dims": list(inputs.dims), "seq_len": inputs.seq_len}
    identity_file = workdir / "identity.json"
    resuming = resume and identity_file.is_file()
    if resuming and json.loads(identity_file.read_text()) != json.loads(json.dumps(identity)):
        raise UserError(f"--resume: {workdir} holds a search with other settings, data or "
                        "checkpoint; start afresh without --resume")  # fmt: skip

    tokenizer = load_tokenizer(inputs.paths["checkpoint"])
    bos = tokenizer.bos_id if source.needs_bos else None
    ids = tokenizer.encode(Path(data).read_text(encoding="utf-8"))
    windows = packed_samples(ids, settings.samples, settings.seq_len, settings.seed, bos)
    model = api.open_model(inputs.paths["checkpoint"], layout, device)
    ranks = SearchRanks.of(sorted(_layers(model)), source.num_layers,
                           next(model.chunks[0].parameters()).device)  # fmt: skip
    if not resuming and ranks.rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        identity_file.write_text(json.dumps(identity, indent=1, sort_keys=True))
    ranks.barrier()
    unit_scores = None
    if settings.local_pruner == "scores":
        unit_scores = {k: inputs.scores[name].float() for k, name in SCORE_NAMES.items()}
    supernet = Supernet(workdir / "supernet", heads=source.num_attention_heads,
                        groups=source.num_query_groups, head_dim=source.head_dim,
                        ffn=source.ffn_hidden_size, refit=settings.refit, scores=unit_scores,
                        write=ranks.writes_stage)  # fmt: skip
    last = settings.stages[-1][0]
    evaluator = Evaluator(model, supernet, grids, windows[:last], ranks)  # keeps dense logits
    share = windows[ranks.my_windows(len(windows))]  # this DP replica's statistics windows
    build_supernet(model, supernet, grids, space, start, share, settings, evaluator, steps)
    built = time.perf_counter() - started
    log(f"tyr: supernet of {source.num_layers} layers in {built:.1f} s; searching at "
        f"TP={ranks.tp} PP={layout.pp} DP={ranks.dp}")
    start_kl = evaluator(start, last)
    state = evolve(start, space, evaluator, config, state_path=workdir / "state.json",
                   identity={"run": _fingerprint(identity)}, resume=resume,
                   save=ranks.rank == 0)  # fmt: skip
    evaluator.restore()
    best = {k: tuple(v) for k, v in state.parent.items()}
    target = {"hidden_size": source.hidden_size, "num_layers": source.num_layers,
              **grids.widths(best)}  # fmt: skip
    record = {
        "start": "uniform",
        "kl_uniform": round(start_kl, 6),
        "kl_found": round(float(state.fitness if state.fitness is not None else start_kl), 6),
        "kl_windows": last,
        "evaluations": state.evaluations,
        "search_tokens": state.samples_evaluated * settings.seq_len,
        "statistics_tokens": settings.samples * settings.seq_len
                             * (source.num_layers if settings.error_accumulation else 1),
        "wall_s": round(time.perf_counter() - started, 1),
        "searched_at": {"tp": ranks.tp, "pp": layout.pp, "vpp": layout.vpp,
                        "sequence_parallel": layout.sequence_parallel, "dp": ranks.dp},
        "settings": {k: (list(map(list, v)) if k == "stages" else v)
                     for k, v in asdict(settings).items()},
        "workdir": str(workdir),
    }  # fmt: skip
    return target, record
