"""Tyr-the-Pruner's (1+lambda) evolutionary search over per-layer widths, with the budget
conserved exactly by construction. Pure logic: the fitness is a callback.

An allocation is, per layer, an index into each pruned module's grid of valid widths (``attn``:
head counts, ``ffn``: FFN widths; both equally spaced, so a block's cost is linear in each
index). An offspring moves ``step`` indices from one layer to another layer of the same cost
class within one module type, so every module type's index total, and with it the cost, never
changes (layers of a class have the same cost per index: all layers for parameters; for FLOPs,
local and global attention layers are separate classes).

Selection: each generation draws ``offspring`` mutants of the parent; each selection stage
scores the survivors on a larger token budget and keeps the best few; the last stage also
scores the parent, which stays unless an offspring beats it. Iterations run coarse to fine: the
move step halves each iteration (at least one grid index), starting from the last result.

The random stream of generation g of iteration t is ``default_rng([seed, t, g])``, and the
state (parent, its fitness, where the search stands) is written after every generation, so a
resumed search equals an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from megatron_prune.checkpoint.atomic import write_text_atomic

Allocation = dict[str, tuple[int, ...]]  # module type -> per-layer grid index
Fitness = Callable[[Allocation, int], float]  # (allocation, samples) -> KL; lower is better


@dataclass(frozen=True)
class Space:
    """What may move: per module type, each layer's index bounds and cost class."""

    low: dict[str, tuple[int, ...]]
    high: dict[str, tuple[int, ...]]
    classes: dict[str, tuple[int, ...]]

    def kinds(self) -> list[str]:
        return [k for k in sorted(self.low) if any(h > lo for lo, h in
                                                   zip(self.low[k], self.high[k], strict=True))]

    def contains(self, alloc: Allocation) -> bool:
        return all(lo <= v <= h for k in self.low
                   for v, lo, h in zip(alloc[k], self.low[k], self.high[k], strict=True))


@dataclass(frozen=True)
class SearchConfig:
    seed: int = 0
    iterations: int = 3
    generations: int = 6
    offspring: int = 8
    coarse_step: dict[str, int] = field(default_factory=dict)  # per kind, iteration 0
    stages: tuple[tuple[int, int], ...] = ((1, 4), (2, 2), (4, 1))  # (samples, survivors)

    def step(self, kind: str, iteration: int) -> int:
        return max(1, self.coarse_step.get(kind, 1) >> iteration)


def mutate(alloc: Allocation, space: Space, rng: np.random.Generator, step: int | dict[str, int],
           tries: int = 64) -> Allocation:  # fmt: skip
    """One budget-neutral move: a module type, a donor layer losing ``step`` indices and a
    receiver of the same cost class gaining them, drawn until the move stays in bounds (the
    parent itself when none is found in ``tries`` draws)."""
    kinds = space.kinds()
    for _ in range(tries if kinds else 0):
        kind = kinds[int(rng.integers(len(kinds)))]
        s = step[kind] if isinstance(step, dict) else step
        values = list(alloc[kind])
        i, j = (int(x) for x in rng.choice(len(values), size=2, replace=False))
        if space.classes[kind][i] != space.classes[kind][j]:
            continue
        values[i] -= s
        values[j] += s
        new = {**alloc, kind: tuple(values)}
        if space.contains(new):
            return new
    return alloc


@dataclass
class SearchState:
    parent: dict[str, list[int]]
    fitness: float | None
    iteration: int = 0
    generation: int = 0
    evaluations: int = 0
    samples_evaluated: int = 0
    history: list[dict] = field(default_factory=list)
    identity: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> SearchState:
        return cls(**json.loads(path.read_text()))


def _key(alloc: Allocation) -> tuple:
    return tuple((k, alloc[k]) for k in sorted(alloc))


def evolve(start: Allocation, space: Space, fitness: Fitness, config: SearchConfig, *,
           state_path: Path | None = None, identity: dict | None = None,
           resume: bool = False, stop_after: int | None = None,
           save: bool = True) -> SearchState:  # fmt: skip
    """Run (or, with ``resume``, continue) the search from ``start``; returns the final state
    (``parent``: the best allocation). ``stop_after``: stop after that many generations of this
    call (the state says where to go on). ``identity``: what must match to resume. ``save``:
    write the state after each generation (one rank of a multi-rank search does)."""
    identity = identity or {}
    if resume and state_path is not None and state_path.is_file():
        state = SearchState.load(state_path)
        if state.identity != identity:
            raise ValueError(f"the search state in {state_path} belongs to another search")
    else:
        state = SearchState({k: list(v) for k, v in start.items()}, None, identity=identity)
    memo: dict[tuple, float] = {}

    def score(alloc: Allocation, samples: int) -> float:
        key = (_key(alloc), samples)
        if key not in memo:
            memo[key] = float(fitness(alloc, samples))
            state.evaluations += 1
            state.samples_evaluated += samples
        return memo[key]

    last_samples = config.stages[-1][0]
    ran = 0
    while state.iteration < config.iterations:
        t = state.iteration
        steps = {k: config.step(k, t) for k in space.kinds()}
        while state.generation < config.generations:
            if stop_after is not None and ran >= stop_after:
                return state
            g = state.generation
            parent = {k: tuple(v) for k, v in state.parent.items()}
            rng = np.random.default_rng([config.seed, t, g])
            pool = [mutate(parent, space, rng, steps) for _ in range(config.offspring)]
            pool = list({_key(a): a for a in pool if _key(a) != _key(parent)}.values())
            for samples, keep in config.stages[:-1]:
                pool = sorted(pool, key=lambda a, n=samples: (score(a, n), _key(a)))[:keep]
            parent_fit = score(parent, last_samples)
            best, best_fit = parent, parent_fit
            for a in sorted(pool, key=_key):  # the parent stays unless strictly beaten
                f = score(a, last_samples)
                if f < best_fit:
                    best, best_fit = a, f
            state.parent = {k: list(v) for k, v in best.items()}
            state.fitness = best_fit
            state.history.append({"iteration": t, "generation": g, "fitness": best_fit,
                                  "improved": best != parent, "step": steps})  # fmt: skip
            state.generation += 1
            ran += 1
            if save and state_path is not None:
                state.save(state_path)
        state.iteration += 1
        state.generation = 0
        if save and state_path is not None:
            state.save(state_path)
    return state


def coarse_step(grid: Sequence[int], source: int, fraction: float) -> int:
    """Grid indices that make ``fraction`` of the source width (at least one)."""
    spacing = grid[1] - grid[0] if len(grid) > 1 else source
    return max(1, int(math.floor(fraction * source / spacing + 0.5)))
