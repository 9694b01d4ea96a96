"""uniform: the reference solver. Every unit gets the same option: the one with the lowest total cost
among those that fit the budget (ties: the smaller plan)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import BitPlan
from .base import Problem, Solver


@dataclass(frozen=True)
class UniformSolver(Solver):
    name = "uniform"

    def solve(self, problem: Problem) -> BitPlan:
        best = None
        for j in range(problem.n_options):
            choice = torch.full((problem.n_units,), j, dtype=torch.long)
            cost, used = problem.total(choice)
            if problem.fits(choice) and (best is None or (cost, used) < best[:2]):
                best = (cost, used, choice)
        if best is None:
            # No single option fits everywhere (the cheapest differs per unit): take each unit's cheapest.
            choice = problem.size.argmin(dim=1)
            return problem.plan(choice, self.name, note="no single option fits; each unit's smallest")
        return problem.plan(best[2], self.name)
