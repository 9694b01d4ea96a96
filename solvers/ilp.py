"""ilp: the exact multiple-choice knapsack, solved as a 0/1 integer program with PuLP.

    minimize   Σ_u Σ_o cost[u,o] · x[u,o]
    subject to Σ_o x[u,o] = 1                      for every unit (or fused group) u     "pick_<u>"
               Σ_u Σ_o size[u,o] · x[u,o] ≤ B      the budget, in bits per weight        "budget"
               Σ_u Σ_o extra[u,o] · x[u,o] ≤ L     an optional second resource (latency)  "resource"
               x[u,o] = 0 where bits[o] ∉ [min_bits, max_bits]

Fused groups get one set of variables whose cost and size are the group's sums. ``backend="auto"`` (the
default) solves it exactly in-process (solvers/mckp.py: Lagrangian reduction and a proving search, ~1 ms)
and hands it to CBC only when that search gives up, or for a second resource or an LP dump. With PuLP,
expressions are built from (variable, coefficient) lists in one call, never by repeated ``+=`` (quadratic in
PuLP, issue #749). ``backend="cbc"`` always uses CBC (bundled with PuLP); ``"highs"`` HiGHS (``highspy``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BitallocError
from ..plan import BitPlan
from .base import Problem, Solver


@dataclass(frozen=True)
class ILPSolver(Solver):
    name = "ilp"
    time_limit: float = 60.0          # seconds
    gap: float = 0.0                  # relative optimality gap at which the solver may stop
    backend: str = "auto"             # "auto" (in-process, CBC when it cannot prove), "cbc" or "highs"
    min_bits: int | None = None
    max_bits: int | None = None
    resource: Any = None              # optional (U, O) tensor of a second resource (e.g. latency per option)
    resource_limit: float | None = None
    dump_lp: str | None = None        # write the model as an LP file here
    msg: bool = False

    def solve(self, problem: Problem) -> BitPlan:
        groups = problem.groups()
        opts = problem.table.options
        allowed = [j for j, o in enumerate(opts)
                   if (self.min_bits is None or o.bits >= self.min_bits) and (self.max_bits is None or o.bits <= self.max_bits)]
        if not allowed:
            raise BitallocError(f"no option lies within bits [{self.min_bits}, {self.max_bits}]: widen the range")
        scale = 1.0 / problem.numel                                     # sizes in bits per weight
        g_cost = torch.stack([problem.cost[g].sum(0) for g in groups])  # (G, O)
        g_size = torch.stack([problem.size[g].sum(0) for g in groups]) * scale
        floor = float(g_size[:, allowed].min(1).values.sum())
        if floor > problem.budget_bits * (1 + 1e-12):
            raise BitallocError(f"budget {problem.budget_bits} is infeasible with bits ≥ {self.min_bits}: "
                                f"the smallest plan takes {floor:.4f} bits per weight")
        if self.backend == "auto" and self.resource is None and not self.dump_lp:
            choice = self._in_process(problem, groups, allowed, g_cost)
            if choice is not None:
                return problem.plan(choice, self.name, status="Optimal")
        import pulp
        cost_scale = 1.0 / max(float(g_cost.abs().max()), 1e-30)         # keep coefficients O(1) for CBC

        model = pulp.LpProblem("bitalloc", pulp.LpMinimize)
        x = {(g, j): pulp.LpVariable(f"x_{g}_{j}", cat=pulp.LpBinary) for g in range(len(groups)) for j in allowed}
        model.setObjective(pulp.LpAffineExpression([(v, float(g_cost[g, j]) * cost_scale) for (g, j), v in x.items()]))
        for g in range(len(groups)):
            pick = pulp.LpAffineExpression([(x[g, j], 1.0) for j in allowed])
            model.addConstraint(pulp.LpConstraint(pick, pulp.LpConstraintEQ, f"pick_{g}", 1.0))
        budget = pulp.LpAffineExpression([(v, float(g_size[g, j])) for (g, j), v in x.items()])
        model.addConstraint(pulp.LpConstraint(budget, pulp.LpConstraintLE, "budget", problem.budget_bits))
        if self.resource is not None:
            res = torch.as_tensor(self.resource, dtype=torch.float64)
            if res.shape != problem.cost.shape or self.resource_limit is None:
                raise BitallocError("resource must be a (units, options) table and resource_limit a number")
            g_res = torch.stack([res[g].sum(0) for g in groups])
            expr = pulp.LpAffineExpression([(v, float(g_res[g, j])) for (g, j), v in x.items()])
            model.addConstraint(pulp.LpConstraint(expr, pulp.LpConstraintLE, "resource", float(self.resource_limit)))
        if self.dump_lp:
            model.writeLP(self.dump_lp)

        status = model.solve(self._backend())
        if pulp.LpStatus[status] not in ("Optimal",) and model.sol_status not in (pulp.LpSolutionIntegerFeasible,):
            raise BitallocError(f"the integer program ended {pulp.LpStatus[status]!r}: the constraints cannot all hold")
        choice = torch.zeros(problem.n_units, dtype=torch.long)
        for g, members in enumerate(groups):
            j = max(allowed, key=lambda j: x[g, j].value() or 0.0)
            choice[members] = j
        if not problem.fits(choice):  # the solver's tolerance let a hair too many bits through
            raise BitallocError("the integer solver's answer exceeds the budget by its tolerance: retry with --gap 0")
        return problem.plan(choice, self.name, status=pulp.LpStatus[status])

    def _in_process(self, problem: Problem, groups, allowed, g_cost) -> torch.Tensor | None:
        """The exact optimum by solvers/mckp.py over the groups' true sizes in bits, or None (no proof in time)."""
        import numpy as np

        from .mckp import solve_mckp
        g_size = torch.stack([problem.size[g].sum(0) for g in groups]).numpy()
        ok = np.zeros(g_size.shape, dtype=bool)
        ok[:, allowed] = True
        picked = solve_mckp(g_cost.numpy(), g_size, problem.capacity, ok)
        if picked is None:
            return None
        choice = torch.zeros(problem.n_units, dtype=torch.long)
        for g, members in enumerate(groups):
            choice[members] = int(picked[g])
        return choice

    def _backend(self):
        import pulp
        common = {"msg": self.msg, "timeLimit": self.time_limit, "gapRel": self.gap}
        if self.backend == "highs":
            solver = pulp.HiGHS(**common)
            if not solver.available():
                raise BitallocError("the HiGHS backend needs `pip install highspy`; or use --ilp-backend cbc")
            return solver
        if self.backend not in ("cbc", "auto"):
            raise BitallocError(f"unknown ILP backend {self.backend!r}: choose auto, cbc or highs")
        return pulp.PULP_CBC_CMD(**common)
