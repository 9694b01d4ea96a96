"""evolutionary: EvoPress-style (1+λ) search over whole plans, scored on the model itself.

The seed solver's plan (``ilp`` by default) refined by the search of solvers/refine.py — level-switch
mutations that keep the true budget, multi-step selection on growing windows, KL to the fp model as the
fitness — for ``generations`` generations or ``time_limit`` seconds. ``bitalloc allocate --refine SECONDS``
runs the same search after any solver, for layer and row plans.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        from .refine import Refiner, layer_space
        if self.fitness is None:
            raise BitallocError("the evolutionary solver scores plans on the model itself: run it through "
                                "`bitalloc allocate --solver evolutionary` (or pass fitness=)")
        seed_plan = get_solver(self.seed_solver).solve(problem)
        space, start = layer_space(problem, seed_plan)
        refiner = Refiner(self.fitness, seconds=self.time_limit, generations=self.generations,
                          offspring=self.offspring, stages=self.stages, patience=self.patience, seed=self.seed,
                          progress=self.progress)
        try:
            best, kl, seed_kl = refiner.run(space, start)
        finally:
            restore = getattr(self.fitness, "restore", None)
            if restore:
                restore()
        self.history = refiner.history
        return problem.plan(space.to_units(best), self.name, seed_solver=self.seed_solver, seed_kl=seed_kl, kl=kl,
                            kl_windows=self.stages[-1][0], generations=len(self.history) - 1,
                            seconds=self.history[-1]["seconds"])
