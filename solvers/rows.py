"""Per-row plans (``--granularity row``): one width per output row of each layer, chosen from the table's
row costs (``SensitivityTable.row_cost``) under the budget.

Every row (and every layer that must keep one width: fused q/k/v and gate/up groups with ``fuse``, MoE
experts, embeddings, Conv1D) is an item of a multiple-choice knapsack with the table's options. A row's size
under width b is what the packer stores for it (kernels/pack.py): its codes, its groups' scales and zero
points, and its 4-bit width tag. Three methods:

    closed_form   the Lagrangian / convex-hull greedy, vectorised: each item's options on the lower convex
                  hull of (size, cost), all hull steps sorted by cost saved per bit, the longest prefix that
                  fits, then one pass filling what is left. Millions of rows in about a second.
    greedy        the same rule step by step with a heap (marginal gain per bit): the reference twin.
    ilp           the exact knapsack (PuLP) over row groups: each layer's rows sorted by sensitivity and cut
                  into ``rows_per_group`` slices that share a width; the gap to the LP bound is reported.

Segment padding of the zero points and the width tags are reserved up front; the plan's exact size is then
checked, and rows are stepped down (cheapest loss per bit first) in the rare case it does not fit. The result
is compared with the layer-granularity ILP plan on the table's own objective, and the better one is returned,
so a row plan is never worse than the layer plan.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from ..errors import BitallocError
from ..kernels.pack import BLOCK, SCALE_BITS, n_groups
from ..options import QuantSpec
from ..plan import BitPlan
from .base import Problem

TAG_BITS = 4


def row_size(spec: QuantSpec, in_features: int, count_overhead: bool = True) -> float:
    """Bits one output row takes under ``spec`` (codes, its scales and zeros, its width tag)."""
    if not count_overhead:
        return float(spec.bits * in_features)
    g = n_groups(in_features, spec.group_size)
    codes = math.ceil(in_features / BLOCK) * BLOCK * spec.bits
    return float(codes + g * SCALE_BITS + (0 if spec.symmetric else g * spec.bits) + TAG_BITS)


@dataclass
class Items:
    """The knapsack: cost (I, O), size (I, O). Items 0..R-1 are rows: ``unit[k]``, ``row[k]``; the items after
    them are whole layers that keep one width, ``forced[k - R]`` their unit indices."""
    cost: torch.Tensor
    size: torch.Tensor
    unit: torch.Tensor
    row: torch.Tensor
    forced: list
    capacity: float
    _hull: tuple | None = None

    @property
    def n_rows(self) -> int:
        return self.unit.numel()

    def hull(self):
        """(start, steps, flat steps, prefix sums) of hull_steps, _flat_steps and _prefix_sums: they depend on the costs and sizes only,
        not on the budget, so they are computed once per table (build_items shares them)."""
        if self._hull is None:
            start, steps = hull_steps(self.cost, self.size)
            flat = _flat_steps(steps) if steps else None
            self._hull = (start, steps, flat, _prefix_sums(flat) if steps else None)
        return self._hull


def build_items(problem: Problem) -> Items:
    """The knapsack of ``problem``; its items (and their hull) are kept on the table for the next budget."""
    key = ("row_items", problem.count_overhead, problem.fuse)
    kept = problem.table.derived.get(key)
    if kept is None:
        kept = problem.table.derived[key] = _build_items(problem)
    return Items(kept.cost, kept.size, kept.unit, kept.row, kept.forced,
                 problem.capacity - kept.capacity, kept._hull)


def _build_items(problem: Problem) -> Items:
    """Items with ``capacity`` = the padding reserve (what build_items takes off the budget)."""
    table = problem.table
    if any(o.ggml for o in table.options):
        raise BitallocError("--granularity row needs our formats (--options 2,3,4,8): a GGUF tensor has one ggml "
                            "type, so plan ggml options per layer (--granularity layer)")
    fams = {(o.group_size, o.symmetric) for o in table.options}
    if len(fams) > 1:
        raise BitallocError("--granularity row needs options of one group size and symmetry (a layer's rows share "
                            f"them), the table has {len(fams)}: drop the g64/g32 formats or use --granularity layer")
    forced = [g for g in problem.groups() if len(g) > 1 or _layer_only(table.units[g[0]])]
    forced_units = {i for g in forced for i in g}
    costs, sizes, unit, row = [], [], [], []
    slack = 0.0
    for i, u in enumerate(table.units):
        if i in forced_units:
            continue
        rows = table.rows_of(i)
        costs.append(rows)
        sizes.append(torch.tensor([row_size(o, u.shape[1], problem.count_overhead) for o in table.options],
                                  dtype=torch.float64).expand(rows.shape[0], -1))
        unit.append(torch.full((rows.shape[0],), i, dtype=torch.long))
        row.append(torch.arange(rows.shape[0]))
        if problem.count_overhead:       # zero-point padding of each width's segment (up to 31 rows)
            g = n_groups(u.shape[1], table.options[0].group_size)
            slack += sum(0 if o.symmetric else (BLOCK - 1) * g * o.bits for o in table.options)
    for g in forced:
        costs.append(problem.cost[g].sum(0, keepdim=True))
        sizes.append(problem.size[g].sum(0, keepdim=True))
    empty = torch.zeros(0, dtype=torch.long)
    items = Items(torch.cat(costs), torch.cat(sizes), torch.cat(unit) if unit else empty,
                  torch.cat(row) if row else empty, forced, slack)
    items.hull()
    return items


def _layer_only(u) -> bool:
    """Units that keep one width for all their rows: everything but nn.Linear — MoE experts (the packed expert
    modules and llama.cpp's merged expert tensors hold one width per expert matrix), embeddings, GPT-2's
    Conv1D (MixedQuantLinear packs Linear layers only; packed.apply refuses the rest)."""
    return u.kind != "linear"


def hull_steps(cost: torch.Tensor, size: torch.Tensor):
    """Each item's walk along the lower convex hull of its options, from its smallest option.

    Returns (start (I,), steps): ``steps`` is a list of (item, from, to, gain per bit, bits) tensors, step k
    of every item in the k-th entry; gains per bit never increase along one item's walk."""
    I, O = cost.shape
    order = torch.argsort(size, dim=1, stable=True)
    cur = order[:, 0].clone()
    rows = torch.arange(I)
    steps = []
    for _ in range(O - 1):
        c0, s0 = cost[rows, cur], size[rows, cur]
        gain = (c0[:, None] - cost) / (size - s0[:, None])                  # cost saved per extra bit
        gain = torch.where((size > s0[:, None]) & (cost < c0[:, None]), gain, torch.full_like(gain, -math.inf))
        best_gain, nxt = gain.max(1)
        live = torch.isfinite(best_gain)
        if not live.any():
            break
        idx = rows[live]
        steps.append((idx, cur[live].clone(), nxt[live], best_gain[live], size[idx, nxt[live]] - size[idx, cur[live]]))
        cur[live] = nxt[live]
    return order[:, 0], steps


def _flat_steps(steps):
    """The hull steps of every item in one list: (item, from, to, gain, bits, level) tensors, and the order
    of decreasing gain per bit (stable, so one item's steps keep their walk order)."""
    item, frm, to, gain, bits = (torch.cat([s[j] for s in steps]) for j in range(5))
    level = torch.cat([torch.full_like(s[0], k) for k, s in enumerate(steps)])
    return item, frm, to, gain, bits, level, torch.argsort(-gain, stable=True)


def _prefix_sums(flat):
    """Along the gain order: bits taken and cost saved after each step (closed_form, lp_bound)."""
    gain, bits, order = flat[3], flat[4], flat[6]
    return torch.cumsum(bits[order], 0), torch.cumsum(gain[order] * bits[order], 0)


def closed_form(items: Items) -> torch.Tensor:
    """(I,) chosen option per item: the longest prefix of hull steps by gain per bit that fits, then a fill."""
    start, steps, flat, sums = items.hull()
    choice = start.clone()
    used = float(items.size[torch.arange(len(start)), start].sum())
    if used > items.capacity * (1 + 1e-12):
        raise BitallocError(f"the budget is infeasible at row granularity: the smallest widths take "
                            f"{used:.0f} bits of {items.capacity:.0f}")
    if not steps:
        return choice
    item, frm, to, gain, bits, level, order = flat
    total = sums[0] + used                        # bits used after each step, best gain per bit first
    take = int((total <= items.capacity).sum())
    taken = torch.zeros(len(gain), dtype=torch.bool)
    taken[order[:take]] = True
    for k in range(len(steps)):                   # level by level: an item's later step overrides its earlier one
        sel = taken & (level == k)                # (one step per item per level: no duplicate indices)
        choice[item[sel]] = to[sel]
    used = float(total[take - 1]) if take else used
    rest = order[take:]
    rest = rest[choice[item[rest]] == frm[rest]]          # fill: steps that start where their item stands
    smallest = float(bits[rest].min()) if rest.numel() else math.inf
    for start in range(0, rest.numel(), 4096):          # in gain order, while anything could still fit
        if items.capacity - used < smallest:
            break
        chunk = rest[start:start + 4096]
        for k, i, f, t, b in zip(chunk.tolist(), item[chunk].tolist(), frm[chunk].tolist(), to[chunk].tolist(),
                                 bits[chunk].tolist()):
            if items.capacity - used < smallest:
                break
            if int(choice[i]) == f and used + b <= items.capacity:
                choice[i] = t
                used += b
    return choice


def greedy(items: Items) -> torch.Tensor:
    """The reference: repeatedly take the hull step with the largest gain per bit that still fits."""
    start, steps, _, _ = items.hull()
    walk: dict[int, list] = {}
    for idx, frm, to, gain, bits in steps:
        for k, f, t, g, b in zip(idx.tolist(), frm.tolist(), to.tolist(), gain.tolist(), bits.tolist()):
            walk.setdefault(k, []).append((f, t, g, b))
    choice = start.clone()
    used = float(items.size[torch.arange(len(start)), start].sum())
    heap = [(-w[0][2], k, 0) for k, w in walk.items()]
    heapq.heapify(heap)
    while heap:
        _, k, n = heapq.heappop(heap)
        f, t, g, b = walk[k][n]
        if used + b > items.capacity:
            continue                               # this item stops here; others may still fit
        choice[k] = t
        used += b
        if n + 1 < len(walk[k]):
            heapq.heappush(heap, (-walk[k][n + 1][2], k, n + 1))
    return choice


def lp_bound(items: Items, capacity: float) -> float:
    """A lower bound on the knapsack's optimum within ``capacity`` bits: the LP relaxation (hull greedy with a
    fractional last step)."""
    start, steps, flat, sums = items.hull()
    obj = float(items.cost[torch.arange(len(start)), start].sum())
    used = float(items.size[torch.arange(len(start)), start].sum())
    if not steps:
        return obj
    gain, order = flat[3], flat[6]
    cum_bits, cum_saved = sums                             # best gain per bit first
    total = cum_bits + used
    k = int((total <= capacity).sum())                     # the steps that fit whole
    if k:
        obj -= float(cum_saved[k - 1])
    if k < len(order):                                     # and a fraction of the next
        obj -= float(gain[order[k]]) * (capacity - (float(total[k - 1]) if k else used))
    return obj


def ilp_groups(items: Items, problem: Problem, rows_per_group: int, time_limit: float) -> torch.Tensor:
    """Exact MCKP (PuLP) over row groups: each unit's rows sorted by their cost at the middle option and cut
    into slices of ``rows_per_group`` that share one width."""
    import pulp
    R = items.n_rows
    groups: list[list[int]] = [[R + f] for f in range(len(items.forced))]
    mid = items.cost.shape[1] // 2
    for i in items.unit.unique().tolist():
        ks = torch.nonzero(items.unit == i)[:, 0]
        ks = ks[torch.argsort(items.cost[ks, mid])].tolist()
        groups += [ks[a:a + rows_per_group] for a in range(0, len(ks), rows_per_group)]
    g_cost = torch.stack([items.cost[g].sum(0) for g in groups])
    g_size = torch.stack([items.size[g].sum(0) for g in groups])
    scale_c = 1.0 / max(float(g_cost.max()), 1e-30)
    scale_s = 1.0 / max(float(g_size.max()), 1.0)
    model = pulp.LpProblem("bitalloc_rows", pulp.LpMinimize)
    O = g_cost.shape[1]
    x = {(g, j): pulp.LpVariable(f"x_{g}_{j}", cat=pulp.LpBinary) for g in range(len(groups)) for j in range(O)}
    model.setObjective(pulp.LpAffineExpression([(v, float(g_cost[g, j]) * scale_c) for (g, j), v in x.items()]))
    for g in range(len(groups)):
        model.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(x[g, j], 1.0) for j in range(O)]),
                                              pulp.LpConstraintEQ, f"pick_{g}", 1.0))
    model.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression([(v, float(g_size[g, j]) * scale_s)
                                                                   for (g, j), v in x.items()]),
                                          pulp.LpConstraintLE, "budget", items.capacity * scale_s))
    model.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit))
    choice = torch.zeros(items.cost.shape[0], dtype=torch.long)
    for g, members in enumerate(groups):
        choice[members] = max(range(O), key=lambda j: x[g, j].value() or 0.0)
    if float(items.size[torch.arange(len(choice)), choice].sum()) > items.capacity * (1 + 1e-9):
        raise BitallocError("the row-group integer program ended over budget: use --solver closed_form")
    return choice


def to_plan(problem: Problem, items: Items, choice: torch.Tensor, solver: str, **extra) -> BitPlan:
    """A BitPlan with ``row_bits`` for the layers whose rows got several widths."""
    table = problem.table
    opts = table.options
    bits_of = torch.tensor([o.bits for o in opts], dtype=torch.int8)
    per_unit: dict[int, torch.Tensor] = {}
    R = items.n_rows
    for f, members in enumerate(items.forced):
        for u in members:
            per_unit[u] = torch.full((table.units[u].shape[0],), int(choice[R + f]), dtype=torch.long)
    off = table.row_offsets()
    flat = torch.zeros(off[-1], dtype=torch.long)
    flat[torch.tensor(off[:-1])[items.unit] + items.row] = choice[:R]
    layers, row_bits, costs = {}, {}, {}
    for i, u in enumerate(table.units):
        idx = per_unit.get(i, flat[off[i]:off[i + 1]])
        layers[u.name] = opts[int(idx.max())]
        row_bits[u.name] = bits_of[idx]
        costs[u.name] = float(table.rows_of(i).gather(1, idx[:, None]).sum())
    plan = BitPlan(layers, {u.name: u.shape for u in table.units}, budget_bits=problem.budget_bits, solver=solver,
                   probe=table.probe, objective=sum(costs.values()), model=table.meta.get("model", {}),
                   extra={"count_overhead": problem.count_overhead, "fuse": problem.fuse, "granularity": "row",
                          **table.plan_extra(), **extra},
                   costs=costs, row_bits=row_bits)
    return plan


def plan_bits(plan: BitPlan, count_overhead: bool) -> float:
    return plan.true_bpw if count_overhead else plan.nominal_bpw


def solve_rows(problem: Problem, method: str = "closed_form", *, rows_per_group: int = 64,
               time_limit: float = 60.0) -> BitPlan:
    """The row-granularity plan of ``problem`` by ``method`` (closed_form, greedy or ilp), never worse on the
    table's objective than the layer-granularity ILP plan and never over budget."""
    from .ilp import ILPSolver
    items = build_items(problem)
    if method == "closed_form":
        choice = closed_form(items)
    elif method == "greedy":
        choice = greedy(items)
    elif method == "ilp":
        choice = ilp_groups(items, problem, rows_per_group, time_limit)
    else:
        raise BitallocError(f"solver {method!r} has no row granularity: use closed_form, greedy or ilp")
    plan = to_plan(problem, items, choice, method)
    for _ in range(3):          # the padding reserve was a worst case: give what it did not use back, re-solve
        spare = (problem.budget_bits - plan_bits(plan, problem.count_overhead)) * problem.numel
        if method == "ilp" or spare < 1e-3 * problem.capacity / max(len(items.cost), 1):
            break
        items.capacity += spare
        choice = closed_form(items) if method == "closed_form" else greedy(items)
        plan = to_plan(problem, items, choice, method)
    for _ in range(20):                           # exact size: step rows down if padding did not fit after all
        over = (plan_bits(plan, problem.count_overhead) - problem.budget_bits) * problem.numel
        if over <= 1e-9 * problem.capacity:
            break
        choice = _step_down(items, choice, over)
        plan = to_plan(problem, items, choice, method)
    else:
        raise BitallocError("could not fit the row plan into the budget: use --granularity layer")
    bound = lp_bound(items, problem.capacity)             # the whole budget, no padding reserve
    layer = ILPSolver().solve(problem)
    if layer.objective is not None and layer.objective < plan.objective:      # never worse than per layer
        layer.extra.update(granularity="row", fallback="the layer plan was better on the table's objective")
        plan = layer
    gap = (plan.objective - bound) / max(abs(bound), 1e-30)
    plan.extra.update(lp_bound=bound, gap_to_lp_bound=gap)
    return plan


def _step_down(items: Items, choice: torch.Tensor, over: float) -> torch.Tensor:
    """Free at least ``over`` bits by moving rows to their next smaller option, least cost per bit first."""
    choice = choice.clone()
    k = torch.arange(len(choice))
    cur_c, cur_s = items.cost[k, choice], items.size[k, choice]
    smaller = items.size < cur_s[:, None]
    loss = (items.cost - cur_c[:, None]) / (cur_s[:, None] - items.size)
    loss = torch.where(smaller, loss, torch.full_like(loss, math.inf))
    best_loss, to = loss.min(1)
    ok = torch.isfinite(best_loss)
    cand = k[ok][torch.argsort(best_loss[ok])]
    freed = (cur_s - items.size[k, to])[cand]
    need = int((torch.cumsum(freed, 0) < over).sum()) + 1
    choice[cand[:need]] = to[cand[:need]]
    return choice
