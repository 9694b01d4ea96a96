"""closed_form: BAQ's convex relaxation, solved by water-filling, then projected onto the real options.

1. Fit, per unit, ``c_u(b) = c_u(b0) · 2^(−α_u (b − b0))`` to the table: a least-squares line through
   (true bits per weight of each option, log2 cost), so α_u is measured per unit rather than fixed at BAQ's
   1.95 (units whose cost does not fall with bits get a tiny α and are starved first).
2. Continuous problem: minimize Σ_u c_u(b_u) subject to Σ_u n_u b_u = B and each b_u within the unit's
   option range. Stationarity gives ``b_u(λ) = b0_u + (log2 c_u(b0_u) − log2(λ n_u / (α_u ln 2))) / α_u``,
   clipped to the range; Σ n_u b_u(λ) falls monotonically in λ, so λ is found by bisection on log λ
   (equal marginal loss per bit across units: the water level).
3. Projection: each unit takes its cheapest option whose true bits per weight do not exceed b_u (so the
   rounded plan can never exceed the budget), then a greedy repair spends the leftover bits on the upgrades
   with the best cost decrease per bit, in vectorized rounds, until no upgrade fits the TRUE budget.

Everything is array arithmetic (float64 torch), so 10⁶ units take well under a second
(examples/bench_solvers.py). Fused groups are solved as one unit whose cost and size are the group's sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..plan import BitPlan
from .base import Problem, Solver

LN2 = math.log(2.0)


def fit_exponential(cost: torch.Tensor, bpw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: (α, log2 c(b0), b0) of the line log2 c = log2 c(b0) − α (b − b0), b0 = mean option bpw."""
    y = torch.log2(cost.clamp_min(1e-300))
    b0 = bpw.mean(1)
    xc = bpw - b0[:, None]
    y0 = y.mean(1)
    slope = (xc * (y - y0[:, None])).sum(1) / (xc * xc).sum(1).clamp_min(1e-12)
    return (-slope).clamp_min(1e-3), y0, b0


def water_fill(alpha, y0, b0, numel, capacity, lo, hi) -> torch.Tensor:
    """Continuous bits per weight b (U,) minimizing Σ 2^(y0 − α(b − b0)) with Σ numel·b = capacity.

    b_u(t) = clip(b0 + (const_u − t) / α_u, lo_u, hi_u) with t = log2 λ, so F(t) = Σ n_u b_u(t) is
    piecewise linear and decreasing, with breakpoints where units reach hi (t_hi) or lo (t_lo). F is
    evaluated in O(log U) from sorted prefix sums, so the bisection on t never re-reads all units."""
    const = y0 - torch.log2(numel / (alpha * LN2))

    def bits(t) -> torch.Tensor:
        return torch.minimum(torch.maximum(b0 + (const - t) / alpha, lo), hi)

    if float((numel * hi).sum()) <= capacity:
        return hi.clone()
    t_hi = const - alpha * (hi - b0)             # t ≤ t_hi: unit at hi
    t_lo = const - alpha * (lo - b0)             # t ≥ t_lo: unit at lo
    inter = numel * (b0 + const / alpha)         # mid units contribute inter − t · slope
    slope = numel / alpha
    o_hi, o_lo = torch.argsort(t_hi), torch.argsort(t_lo)
    s_hi, s_lo = t_hi[o_hi], t_lo[o_lo]
    zero = torch.zeros(1, dtype=torch.float64)
    c_nhi = torch.cat([zero, torch.cumsum((numel * hi)[o_hi], 0)])
    c_in_hi = torch.cat([zero, torch.cumsum(inter[o_hi], 0)])
    c_sl_hi = torch.cat([zero, torch.cumsum(slope[o_hi], 0)])
    c_nlo = torch.cat([zero, torch.cumsum((numel * lo)[o_lo], 0)])
    c_in_lo = torch.cat([zero, torch.cumsum(inter[o_lo], 0)])
    c_sl_lo = torch.cat([zero, torch.cumsum(slope[o_lo], 0)])

    def F(T: torch.Tensor) -> torch.Tensor:
        i = torch.searchsorted(s_hi, T, right=False)        # units with t_hi < T have left hi
        j = torch.searchsorted(s_lo, T, right=True)         # units with t_lo ≤ T sit at lo
        return (c_nhi[-1] - c_nhi[i]) + c_nlo[j] + (c_in_hi[i] - c_in_lo[j]) - T * (c_sl_hi[i] - c_sl_lo[j])

    lo_t, hi_t = float(s_hi[0]) - 1.0, float(s_lo[-1]) + 1.0   # F(lo_t) = Σ n·hi > capacity ≥ F(hi_t)
    for _ in range(200):                          # each F(t) costs two binary searches, not a pass over U
        mid = 0.5 * (lo_t + hi_t)
        if float(F(torch.tensor([mid], dtype=torch.float64))[0]) > capacity:
            lo_t = mid
        else:
            hi_t = mid
        if hi_t - lo_t <= 1e-13 * max(1.0, abs(mid)):
            break
    t = hi_t
    b = bits(t)
    while float((numel * b).sum()) > capacity:            # rounding: step t up until the sum fits
        t = t + 1e-9 * max(1.0, abs(float(t)))
        b = bits(t)
    return b


def project_and_repair(cost: torch.Tensor, size: torch.Tensor, numel: torch.Tensor, b: torch.Tensor,
                       capacity: float, rounds: int = 64) -> torch.Tensor:
    """Integer options (U,) under the TRUE capacity: round down to the options, then greedy upgrades."""
    U = cost.shape[0]
    rows = torch.arange(U)
    bpw = size / numel[:, None]
    fits = bpw <= b[:, None] * (1 + 1e-12)
    fits[rows, size.argmin(1)] = True                        # the smallest option is always allowed
    choice = torch.where(fits, cost, torch.full_like(cost, math.inf)).argmin(1)
    used = float(size[rows, choice].sum())
    if used > capacity:                                      # only when even the smallest options overflow
        return size.argmin(1)
    for _ in range(rounds):
        slack = capacity - used
        d_size = size - size[rows, choice][:, None]          # (U, O) extra bits of each move
        d_cost = cost[rows, choice][:, None] - cost          # cost saved by each move
        ok = (d_size > 0) & (d_cost > 0) & (d_size <= slack)
        if not bool(ok.any()):
            break
        ratio = torch.where(ok, d_cost / d_size, torch.full_like(cost, -1.0))
        best_ratio, best_opt = ratio.max(1)
        cand = torch.nonzero(best_ratio > 0).squeeze(1)
        order = cand[torch.argsort(best_ratio[cand], descending=True)]
        extra = d_size[order, best_opt[order]]
        take = order[torch.cumsum(extra, 0) <= slack]         # the best prefix that fits
        if len(take) == 0:                                   # the best single move is too big: take the first
            first = order[extra <= slack][:1]               # that fits on its own
            take = first
        choice[take] = best_opt[take]
        used = float(size[rows, choice].sum())
    return choice


def closed_form_choice(cost: torch.Tensor, size: torch.Tensor, numel: torch.Tensor,
                       capacity: float) -> torch.Tensor:
    """The whole method on arrays: cost, size (U, O) float64; numel (U,); capacity in bits."""
    bpw = size / numel[:, None]
    alpha, y0, b0 = fit_exponential(cost, bpw)
    b = water_fill(alpha, y0, b0, numel, capacity, bpw.min(1).values, bpw.max(1).values)
    return project_and_repair(cost, size, numel, b, capacity)


@dataclass(frozen=True)
class ClosedFormSolver(Solver):
    name = "closed_form"

    def solve(self, problem: Problem) -> BitPlan:
        groups = problem.groups()
        if all(len(g) == 1 for g in groups):
            cost, size = problem.cost.double(), problem.size.double()
            numel = problem.table.numels()
        else:
            cost = torch.stack([problem.cost[g].sum(0) for g in groups]).double()
            size = torch.stack([problem.size[g].sum(0) for g in groups]).double()
            numel = torch.tensor([sum(problem.table.units[i].numel for i in g) for g in groups], dtype=torch.float64)
        g_choice = closed_form_choice(cost, size, numel, problem.capacity)
        choice = torch.zeros(problem.n_units, dtype=torch.long)
        for k, members in enumerate(groups):
            choice[members] = g_choice[k]
        return problem.plan(choice, self.name)
