"""The Solver interface: SensitivityTable + budget -> BitPlan, never over budget.

A Problem is the table reduced to what solvers need: cost (U, O), size (U, O) in bits (true or nominal),
the number of weights, the budget in total bits and the fused groups. Every solver builds its plan through
``Problem.plan`` so budgets, errors and metadata are handled in one place.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import BitallocError
from ..registry import NEEDS_MODEL, SOLVERS, instantiate
from ..plan import BitPlan
from ..sensitivity.table import SensitivityTable
from ..units import EXPERT_KINDS

MAX_BUDGET = 16.0


@dataclass
class Problem:
    table: SensitivityTable
    budget_bits: float
    count_overhead: bool = True
    fuse: bool = False

    def __post_init__(self) -> None:
        if not (0 < self.budget_bits <= MAX_BUDGET):
            raise BitallocError(f"budget {self.budget_bits} bits per weight is out of range: give a value in "
                                f"(0, {MAX_BUDGET:g}]")
        self.cost = self.table.cost                                          # (U, O)
        self.size = self.table.sizes(count_overhead=self.count_overhead)     # (U, O) bits
        self.numel = float(self.table.numels().sum())
        self.capacity = self.budget_bits * self.numel                          # total bits allowed
        floor = float(self.size.min(dim=1).values.sum())
        if floor > self.capacity * (1 + 1e-12):
            smallest = floor / self.numel
            raise BitallocError(f"budget {self.budget_bits} bits per weight is infeasible: the cheapest options "
                                f"already take {smallest:.4f}; give --budget ≥ {_ceil4(smallest)}")

    @property
    def n_units(self) -> int:
        return self.cost.shape[0]

    @property
    def n_options(self) -> int:
        return self.cost.shape[1]

    def groups(self) -> list[list[int]]:
        """Unit indices that must share one option: fused groups when ``fuse``, else singletons."""
        if not self.fuse:
            return [[i] for i in range(self.n_units)]
        by_tag: dict[str, list[int]] = {}
        out: list[list[int]] = []
        for i, u in enumerate(self.table.units):
            if u.fused_group is None:
                out.append([i])
            else:
                if u.fused_group not in by_tag:
                    by_tag[u.fused_group] = []
                    out.append(by_tag[u.fused_group])
                by_tag[u.fused_group].append(i)
        return out

    def total(self, choice: torch.Tensor) -> tuple[float, float]:
        """(objective, bits used) of a choice vector (U,) of option indices."""
        idx = torch.arange(self.n_units)
        return float(self.cost[idx, choice].sum()), float(self.size[idx, choice].sum())

    def fits(self, choice: torch.Tensor) -> bool:
        return self.total(choice)[1] <= self.capacity * (1 + 1e-12)

    def plan(self, choice: torch.Tensor | list[int], solver: str, **extra: Any) -> BitPlan:
        choice = torch.as_tensor(choice, dtype=torch.long)
        objective, used = self.total(choice)
        if used > self.capacity * (1 + 1e-12):
            raise AssertionError(f"{solver} produced a plan over budget ({used / self.numel:.6f} > {self.budget_bits})")
        for group in self.groups():
            if len({int(choice[i]) for i in group}) > 1:
                raise AssertionError(f"{solver} split fused group {[self.table.units[i].name for i in group]}")
        specs = [self.table.options[int(j)] for j in choice]
        costs = {u.name: float(self.cost[i, int(j)]) for i, (u, j) in enumerate(zip(self.table.units, choice))}
        meta = self.table.meta
        experts = [u.expert for u in self.table.units if u.kind in EXPERT_KINDS]
        if experts:                  # how a plan's MoE experts are named: one per expert, or one per layer
            extra["experts"] = "per-layer" if experts[0] is None else "per-expert"
        return BitPlan.from_choice(
            self.table.units, specs, budget_bits=self.budget_bits, solver=solver, probe=self.table.probe,
            objective=objective, model=meta.get("model", {}), costs=costs,
            extra={"count_overhead": self.count_overhead, "fuse": self.fuse, **self.table.plan_extra(), **extra})


def _ceil4(x: float) -> float:
    import math
    return math.ceil(x * 10000) / 10000


class Solver(ABC):
    """Base class; subclasses are dataclasses whose fields are the solver's settings."""

    name: ClassVar[str]

    @abstractmethod
    def solve(self, problem: Problem) -> BitPlan:
        """Choose one option per unit with Σ size ≤ capacity, minimizing Σ cost."""

    def __call__(self, table: SensitivityTable, budget_bits: float, *, count_overhead: bool = True,
                 fuse: bool = False) -> BitPlan:
        return self.solve(Problem(table, budget_bits, count_overhead=count_overhead, fuse=fuse))




def get_solver(name: str, **settings: Any) -> Solver:
    """Instantiate a solver by name (lazy import: pulp loads only when ``ilp`` is used)."""
    return instantiate(SOLVERS, "solver", name, settings)
