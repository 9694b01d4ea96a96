"""evolutionary: EvoPress-style (1+λ) search over whole plans, scored on the model itself.

The additive costs of a sensitivity table ignore how layers' errors interact; this solver measures them.

    parent = the ilp plan (or another seed solver's)
    each generation:
        λ offspring = parent + level-switch mutation (below)
        multi-step selection: score all offspring on the first few calibration windows, keep the best
        ones, score those on more windows, ... (``stages``); the survivor replaces the parent only if it
        beats the parent on the last stage's windows
    stop at ``generations``, ``time_limit`` seconds, or ``patience`` generations without improvement

Level-switch mutation that keeps the TRUE budget between units of different sizes (EvoPress swaps levels
only inside groups of equal-size layers): raise 1–3 random units by one level (the next larger option),
then lower random other units one level at a time until the plan fits the budget again in true bits.
Units (or fused groups) of any size can trade bits, and a plan is never over budget.

Fitness = KL(fp ‖ quantized) of the next-token distribution (alloc/fitness.py); every option of every
unit is quantized once and held in memory. Deterministic for a given ``seed``.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import BitallocError
from ..plan import BitPlan
from .base import Problem, Solver, get_solver


@dataclass
class EvolutionarySolver(Solver):
    name = "evolutionary"
    fitness: Any = None                       # callable(choice, n_windows) -> float; alloc.fitness.KLFitness
    seed_solver: str = "ilp"
    generations: int = 50
    offspring: int = 16
    stages: tuple = ((2, 4), (8, 1))          # (windows, survivors) per selection step; the last keeps 1
    time_limit: float | None = None           # seconds
    patience: int | None = None               # stop after this many generations without improvement
    seed: int = 0
    progress: bool = True
    history: list = field(default_factory=list, repr=False)

    def solve(self, problem: Problem) -> BitPlan:
        if self.fitness is None:
            raise BitallocError("the evolutionary solver scores plans on the model itself: run it through "
                                "`bitalloc allocate --solver evolutionary` (or pass fitness=)")
        rng = random.Random(self.seed)
        groups = problem.groups()
        # options of each group ordered by size (the "levels"), with the group's total size per option
        g_size = torch.stack([problem.size[g].sum(0) for g in groups]).double()
        levels = [sorted(range(problem.n_options), key=lambda j: (float(g_size[k, j]), j)) for k in range(len(groups))]
        seed_plan = get_solver(self.seed_solver).solve(problem)
        index = {o: j for j, o in enumerate(problem.table.options)}
        parent = [index[seed_plan.layers[problem.table.units[g[0]].name]] for g in groups]
        final_windows = self.stages[-1][0]

        def expand(gchoice):
            choice = torch.zeros(problem.n_units, dtype=torch.long)
            for k, members in enumerate(groups):
                choice[members] = gchoice[k]
            return choice

        def used(gchoice) -> float:
            return float(sum(g_size[k, j] for k, j in enumerate(gchoice)))

        def mutate(gchoice):
            child = list(gchoice)
            for _ in range(100):
                child = list(gchoice)
                ups = [k for k in range(len(groups)) if levels[k].index(child[k]) < len(levels[k]) - 1]
                if not ups:
                    return None
                raised = set()
                for k in rng.sample(ups, min(len(ups), rng.randint(1, 3))):
                    child[k] = levels[k][levels[k].index(child[k]) + 1]
                    raised.add(k)
                while used(child) > problem.capacity * (1 + 1e-12):
                    downs = [k for k in range(len(groups)) if k not in raised and levels[k].index(child[k]) > 0]
                    if not downs:
                        break
                    k = rng.choice(downs)
                    child[k] = levels[k][levels[k].index(child[k]) - 1]
                if used(child) <= problem.capacity * (1 + 1e-12) and child != list(gchoice):
                    return child
            return None

        t0 = time.time()
        parent_score = self.fitness(expand(parent), final_windows)
        seed_score = parent_score
        self.history = [{"generation": 0, "kl": parent_score, "seconds": 0.0}]
        stale = 0
        bar = tqdm(range(1, self.generations + 1), desc="evolutionary", leave=False, disable=not self.progress)
        for gen in bar:
            children = [c for c in (mutate(parent) for _ in range(self.offspring)) if c is not None]
            if not children:
                break
            pool = children
            for windows, keep in self.stages:
                scored = sorted(((self.fitness(expand(c), windows), i) for i, c in enumerate(pool)))
                pool = [pool[i] for _, i in scored[:keep]]
                best_score = scored[0][0]
            if best_score < parent_score:
                parent, parent_score, stale = pool[0], best_score, 0
            else:
                stale += 1
            elapsed = time.time() - t0
            self.history.append({"generation": gen, "kl": parent_score, "seconds": elapsed})
            bar.set_postfix(kl=f"{parent_score:.5f}", seed=f"{seed_score:.5f}")
            if (self.time_limit is not None and elapsed > self.time_limit) or \
                    (self.patience is not None and stale >= self.patience):
                break
        restore = getattr(self.fitness, "restore", None)
        if restore:
            restore()
        return problem.plan(expand(parent), self.name, seed_solver=self.seed_solver, seed_kl=seed_score,
                            kl=parent_score, kl_windows=final_windows, generations=len(self.history) - 1,
                            seconds=round(time.time() - t0, 2))
