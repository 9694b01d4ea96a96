"""refine: the EvoPress search (Sieberling et al. 2024) as the finishing stage of a plan, scored on the model.

The additive costs of a sensitivity table ignore how layers' errors interact; this stage measures them. It
starts from a plan (the ILP or closed-form one) and moves bits between its parts, keeping a move only when
the KL of the whole quantized model to the fp one, on calibration windows, goes down:

    parent = the plan
    each generation:
        λ offspring = parent + a level-switch mutation (below)
        multi-step selection: score every offspring on the first windows, keep the best few, score those on
        more windows, …  (``stages``: (windows, survivors), the last keeping one); the survivor replaces the
        parent only if it beats the parent on the last stage's windows
    until ``seconds`` have passed (or ``generations``, or ``patience`` generations without a better plan)

The search moves *items* (a ``Space``): for a layer plan, each layer (or fused group); for a row plan, each
output row, and each layer that keeps one width (fused groups, experts). Level-switch mutation at equal size:
items of one random owner (a layer) move up one level (the next larger option) — for rows, the rows whose
table cost falls most per added bit, a random share of the layer's — and items of other random owners move
down one level, the least cost per freed bit first, until the plan fits the budget again in true bits.
Bits thus move between layers of any size (EvoPress swaps levels between equal-size layers), a plan is never
over budget, and the parent is only ever replaced by a plan that scores better on the same windows: the result
is never worse on the fitness than the seed. Deterministic for a given ``seed``.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import BitallocError
from ..plan import BitPlan
from .base import Problem


@dataclass
class Space:
    """Items the search moves: cost (I, O), size (I, O) in bits, ``owner`` (I,) the layer (or group) each item
    belongs to; ``capacity`` bits in all. ``to_units(choice)`` turns item choices into the fitness's per-unit
    choices, ``to_plan(choice)`` into a BitPlan."""
    cost: torch.Tensor
    size: torch.Tensor
    owner: torch.Tensor
    capacity: float
    to_units: object
    to_plan: object
    levels: torch.Tensor = field(init=False)            # (I, O) options of each item, by size

    def __post_init__(self) -> None:
        self.levels = torch.argsort(self.size, dim=1, stable=True)
        self.rank = torch.empty_like(self.levels)          # (I, O) level of each option
        self.rank.scatter_(1, self.levels, torch.arange(self.size.shape[1]).expand_as(self.levels).contiguous())
        self.members = [torch.nonzero(self.owner == k)[:, 0] for k in range(int(self.owner.max()) + 1)]

    def used(self, choice: torch.Tensor) -> float:
        return float(self.size[torch.arange(len(choice)), choice].sum())


def layer_space(problem: Problem, plan: BitPlan) -> tuple[Space, torch.Tensor]:
    """(Space, start): one item per layer, or per fused group (``problem.fuse``)."""
    groups = problem.groups()
    index = {o: j for j, o in enumerate(problem.table.options)}
    start = torch.tensor([index[plan.layers[problem.table.units[g[0]].name]] for g in groups])

    def to_units(choice):
        out = torch.zeros(problem.n_units, dtype=torch.long)
        for k, members in enumerate(groups):
            out[members] = choice[k]
        return out

    def to_plan(choice, **extra):
        return problem.plan(to_units(choice), plan.solver, **extra)
    cost = torch.stack([problem.cost[g].sum(0) for g in groups])
    size = torch.stack([problem.size[g].sum(0) for g in groups])
    return Space(cost, size, torch.arange(len(groups)), problem.capacity, to_units, to_plan), start


def row_space(problem: Problem, plan: BitPlan) -> tuple[Space, torch.Tensor]:
    """(Space, start) of a row plan: the row solver's items (solvers/rows.py), owned by their layer."""
    from .rows import build_items, to_plan as rows_to_plan
    table = problem.table
    items = build_items(problem)               # its capacity keeps the worst case of zero-point padding free
    bits_index = {o.bits: j for j, o in enumerate(table.options)}
    off = table.row_offsets()
    R = items.n_rows
    start = torch.zeros(len(items.cost), dtype=torch.long)
    for k in range(R):
        u = table.units[int(items.unit[k])]
        start[k] = bits_index[int(plan.row_bits[u.name][int(items.row[k])])] if u.name in plan.row_bits else \
            bits_index[plan.layers[u.name].bits]
    for f, members in enumerate(items.forced):
        start[R + f] = bits_index[plan.layers[table.units[members[0]].name].bits]
    owner = torch.cat([items.unit, torch.arange(len(items.forced)) + table.cost.shape[0]])
    owner = torch.unique(owner, return_inverse=True)[1]

    def to_units(choice):
        out = []
        flat = torch.zeros(off[-1], dtype=torch.long)
        flat[torch.tensor(off[:-1])[items.unit] + items.row] = choice[:R]
        forced = {u: int(choice[R + f]) for f, members in enumerate(items.forced) for u in members}
        for i, u in enumerate(table.units):
            out.append(forced[i] if i in forced else flat[off[i]:off[i + 1]].clone())
        return out

    def to_plan(choice, **extra):
        p = rows_to_plan(problem, items, choice, plan.solver, **extra)
        return p
    return Space(items.cost, items.size, owner, items.capacity, to_units, to_plan), start


@dataclass
class Refiner:
    """The search; ``fitness(units_choice, n_windows) -> KL`` (alloc/fitness.py)."""
    fitness: object
    seconds: float | None = 60.0
    generations: int | None = None
    offspring: int = 8
    stages: tuple = ((1, 3), (4, 1))            # (windows, survivors) per selection step; the last keeps 1
    patience: int | None = None
    share: tuple = (0.05, 0.5)                  # rows: share of a layer's rows one mutation moves up
    seed: int = 0
    progress: bool = True
    history: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.seconds is None and self.generations is None:
            raise BitallocError("refine needs an end: give seconds (--refine SECONDS) or a number of generations")
        if self.stages[-1][1] != 1 or any(w < 1 or k < 1 for w, k in self.stages):
            raise BitallocError(f"refine stages {self.stages} must be (windows, survivors) pairs ending with one survivor")

    def mutate(self, space: Space, choice: torch.Tensor, rng: random.Random) -> torch.Tensor | None:
        """Raise items of one owner one level, lower items of others until the plan fits (see above)."""
        I = torch.arange(len(choice))
        rank = space.rank[I, choice]
        top = space.size.shape[1] - 1
        up_owners = sorted({int(o) for o in space.owner[rank < top].unique()})
        if not up_owners:
            return None
        child = choice.clone()
        a = rng.choice(up_owners)
        items = space.members[a]
        items = items[rank[items] < top]
        nxt = space.levels[items, rank[items] + 1]
        gain = (space.cost[items, choice[items]] - space.cost[items, nxt]) / \
            (space.size[items, nxt] - space.size[items, choice[items]]).clamp(min=1e-9)
        n_up = len(items) if len(items) == 1 else max(1, round(len(items) * rng.uniform(*self.share)))
        picked = items[torch.argsort(-gain, stable=True)[:n_up]]
        child[picked] = space.levels[picked, rank[picked] + 1]
        over = space.used(child) - space.capacity
        downs = [o for o in range(len(space.members)) if o != a]
        rng.shuffle(downs)
        for b in downs:
            if over <= 1e-6 * space.capacity:
                break
            items = space.members[b]
            r = space.rank[items, child[items]]
            items = items[r > 0]
            if not len(items):
                continue
            prev = space.levels[items, space.rank[items, child[items]] - 1]
            freed = space.size[items, child[items]] - space.size[items, prev]
            loss = (space.cost[items, prev] - space.cost[items, child[items]]) / freed.clamp(min=1e-9)
            order = torch.argsort(loss, stable=True)
            need = int((torch.cumsum(freed[order], 0) < over).sum()) + 1
            take = order[:need]
            child[items[take]] = prev[take]
            over -= float(freed[take].sum())
        if space.used(child) > space.capacity * (1 + 1e-12) or torch.equal(child, choice):
            return None
        return child

    def run(self, space: Space, start: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """(best item choice, its fitness, the start's fitness) on the last stage's windows."""
        rng = random.Random(self.seed)
        final = self.stages[-1][0]
        t0 = time.time()
        score = lambda c, w: float(self.fitness(space.to_units(c), w))
        parent, parent_score = start.clone(), score(start, final)
        seed_score = parent_score
        self.history = [{"generation": 0, "kl": parent_score, "seconds": 0.0}]
        stale, gen = 0, 0
        total = self.seconds if self.seconds is not None else None
        bar = tqdm(total=round(total) if total else self.generations, desc="refine", leave=False,
                   disable=not self.progress, unit="s" if total else "gen")
        while True:
            gen += 1
            children = [c for c in (self.mutate(space, parent, rng) for _ in range(self.offspring)) if c is not None]
            if not children:
                break
            pool, late = children, False
            for windows, keep in self.stages:
                scored = []
                for i, c in enumerate(pool):
                    if total is not None and time.time() - t0 >= total:
                        late = True                 # out of time mid-generation: this generation is dropped
                        break
                    scored.append((score(c, windows), i))
                if late:
                    break
                scored.sort()
                pool = [pool[i] for _, i in scored[:keep]]
                best = scored[0][0]
            if late:
                break
            if best < parent_score:
                parent, parent_score, stale = pool[0], best, 0
            else:
                stale += 1
            elapsed = time.time() - t0
            self.history.append({"generation": gen, "kl": parent_score, "seconds": round(elapsed, 2)})
            bar.set_postfix(kl=f"{parent_score:.5f}", seed=f"{seed_score:.5f}", gen=gen)
            bar.n = min(round(elapsed), total) if total else gen
            bar.refresh()
            if (total is not None and elapsed >= total) or (self.generations is not None and gen >= self.generations) \
                    or (self.patience is not None and stale >= self.patience):
                break
        bar.close()
        return parent, parent_score, seed_score


def refine(problem: Problem, plan: BitPlan, fitness, **settings) -> BitPlan:
    """``plan`` refined on ``fitness`` (layer or row plan, as the plan is); its extra records the search."""
    rows = bool(plan.row_bits)
    space, start = (row_space if rows else layer_space)(problem, plan)
    refiner = Refiner(fitness, **settings)
    t0 = time.time()
    try:
        best, kl, seed_kl = refiner.run(space, start)
    finally:
        restore = getattr(fitness, "restore", None)
        if restore:
            restore()
    info = {"seed_kl": seed_kl, "kl": kl, "kl_windows": refiner.stages[-1][0],
            "generations": len(refiner.history) - 1, "seconds": round(time.time() - t0, 1),
            "evaluations": getattr(fitness, "evaluations", None)}
    if torch.equal(best, start):
        plan.extra["refine"] = info
        return plan
    out = space.to_plan(best)
    for key, value in plan.extra.items():          # what the seed recorded (granularity, its row check, …)
        out.extra.setdefault(key, value)
    out.extra["refine"] = info
    if math.isfinite(kl) and out.true_bpw > problem.budget_bits + 1e-9 and problem.count_overhead:
        raise AssertionError(f"refine produced a plan over budget ({out.true_bpw:.6f} > {problem.budget_bits})")
    return out
