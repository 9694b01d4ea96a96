"""The finishing stage of ``allocate``, measured on the model (alloc/fitness.py): after a solver has chosen a
plan from the table's additive costs,

    check_rows(...)    a row plan is kept only if its KL to the fp model on calibration windows is no worse
                       than the layer plan's (per-row costs are fragile: a rounding detail can flip them);
                       otherwise the layer plan is returned, and a warning says so
    check_widths(...)  the plan against the ones solved without the widths below the budget's floor and one bit
                       below it (2 bits at 3.25): additive costs under-rate what very low widths do together
                       (Gemma-3-270M, GPTQ, kfac, 3.25 bpw: ppl 66.6 with 2-bit layers, 57.1 without, uniform
                       W3 61.5; in ggml types at Q3_K_M's 4.54 bpw: 51.9 with Q2_K, 47.5 without), and
                       against the alternatives a user would otherwise pick at that budget (``alternatives``:
                       uniform, llama.cpp's preset for ggml options); the best measured is returned
    refine_plan(...)   the EvoPress search of solvers/refine.py for ``seconds``, layer or row plan alike

Both score plans with the quantizer the plan will be applied with (RTN, or GPTQ per unit on its own XᵀX).
"""
from __future__ import annotations

import warnings

from .config import CHECK_WINDOWS
from .errors import BitallocWarning
from .plan import BitPlan

REFINE_WINDOWS = CHECK_WINDOWS    # windows of the checks and of the refine fitness's last selection stage
REFINE_STRIDE = 4           # the fitness takes the KL at every 4th position (the LM head's cost; the decoder runs all)


def problem_of(table, plan: BitPlan):
    from .solvers.base import Problem
    return Problem(table, plan.budget_bits, count_overhead=plan.extra.get("count_overhead", True),
                   fuse=plan.extra.get("fuse", False))


def fitness_for(prepared, quantizer, windows: int = REFINE_WINDOWS, stride: int = REFINE_STRIDE, grams=None):
    """The checks' fitness: on the held-out windows (``Prepared.held_out``, which the probe did not see; GPTQ's
    XᵀX then comes from the calibration windows after them: the probe's, whose XᵀX ``grams`` the kfac probe
    may have kept), else on the first calibration windows."""
    import dataclasses

    import torch

    from .fitness import make_fitness
    held = getattr(prepared, "held_out", None)
    if held is not None and len(held):
        prepared = dataclasses.replace(prepared, tokens=torch.cat([held, prepared.tokens]), held_out=None)
        windows = min(windows, len(held))
    else:
        grams = None                          # the GPTQ windows are not the probe's
    fitness = make_fitness(prepared, max_windows=windows, quantizer=quantizer, stride=stride, grams=grams)
    fitness.held_out = held is not None and len(held) > 0
    return fitness


def _choice(table, plan: BitPlan) -> list:
    """The fitness's per-unit choice of a plan: an option index, or one per output row."""
    import torch
    index = {o: j for j, o in enumerate(table.options)}
    by_bits = {o.bits: j for j, o in enumerate(table.options)}
    out = []
    for u in table.units:
        if u.name in plan.row_bits:
            out.append(torch.tensor([by_bits[int(b)] for b in plan.row_bits[u.name].tolist()], dtype=torch.long))
        else:
            out.append(index[plan.layers[u.name]])
    return out


def check_rows(table, row_plan: BitPlan, fitness, windows: int = REFINE_WINDOWS) -> BitPlan:
    """``row_plan``, or the layer ILP plan at the same budget when that one scores better on ``fitness``."""
    from .solvers.ilp import ILPSolver
    if not row_plan.row_bits:
        return row_plan
    layer = ILPSolver().solve(problem_of(table, row_plan))
    kl_row, kl_layer = fitness(_choice(table, row_plan), windows), fitness(_choice(table, layer), windows)
    checked = {"row_kl": kl_row, "layer_kl": kl_layer, "windows": windows,
               "held_out": bool(getattr(fitness, "held_out", False))}
    if kl_row <= kl_layer:
        row_plan.extra["row_check"] = checked
        return row_plan
    where = "held-out calibration" if checked["held_out"] else "calibration"
    warnings.warn(f"the row plan scores worse than the layer plan on {windows} {where} windows (KL {kl_row:.5f} "
                  f"vs {kl_layer:.5f}): returning the layer plan", BitallocWarning, stacklevel=3)
    layer.extra.update(granularity="row", fallback="the layer plan scored better on calibration windows",
                       row_check=checked)
    return layer


def effective_bits(table):
    """(units, options) tensor: the width each option stores each unit at (a ggml type on rows it does not fit
    takes llama.cpp's fallback: Q2_K is Q4_0 on Gemma-3-270M's 640-wide rows; float options count 16)."""
    import torch

    from .ggml.types import TYPES
    out = torch.empty(len(table.units), len(table.options))
    for j, o in enumerate(table.options):
        for i, u in enumerate(table.units):
            out[i, j] = 16 if o.is_float else TYPES[o.ggml_for(u.shape[1])].bits if o.ggml else o.bits
    return out


def without_low_widths(table, plan: BitPlan, floor: int | None = None) -> BitPlan | None:
    """``plan``'s problem solved again (ILP per layer, closed form per row) with no unit at fewer than
    ``floor`` (default ⌊budget⌋) bits as stored; None when nothing is dropped, the smaller problem is
    infeasible, or the plan is the same. Options dropped for every unit leave the table; a ggml option dropped
    only where it is a real low-width K-quant (its fallback elsewhere is wide enough) is made too big to fit
    there (its size, not its cost: costs keep their scale for the solver)."""
    from .errors import BitallocError
    from .sensitivity.table import SensitivityTable
    from .solvers.ilp import ILPSolver
    from .solvers.rows import solve_rows
    floor = int(plan.budget_bits) if floor is None else floor
    low = effective_bits(table) < floor                           # (units, options): what the floor drops
    if not low.any() or low.all(dim=1).any():
        return None
    keep = [j for j in range(len(table.options)) if not low[:, j].all()]
    low = low[:, keep]
    if low.any() and plan.row_bits:
        return None                               # per-unit drops: row plans are not made from ggml options
    sub = SensitivityTable(table.units, [table.options[j] for j in keep], table.cost[:, keep], dict(table.meta),
                           None if table.row_cost is None else table.row_cost[:, keep])
    try:
        problem = problem_of(sub, plan)
        if low.any():                             # a dropped (unit, option) takes more than the whole budget
            problem.size = problem.size.clone()
            problem.size[low] = problem.capacity + 1
        other = solve_rows(problem, "closed_form") if plan.row_bits else ILPSolver().solve(problem)
    except BitallocError:                       # infeasible without the low widths
        return None
    index = {o: j for j, o in enumerate(sub.options)}
    if any(bool(low[i, index[other.layers[u.name]]]) for i, u in enumerate(sub.units)):
        return None                             # a solver that took a too-big option: the budget had no other way
    return None if _same(other, plan) else other


def _same(a: BitPlan, b: BitPlan) -> bool:
    return a.layers == b.layers and set(a.row_bits) == set(b.row_bits) and \
        all(bool((a.row_bits[n] == b.row_bits[n]).all()) for n in b.row_bits)


def alternatives(table, plan: BitPlan) -> dict[str, BitPlan]:
    """The plans a user would otherwise pick that fit ``plan``'s budget: one width for every unit (the widest
    option that fits everywhere), and with ggml options the largest of llama.cpp's presets that fits (its
    type mix, as ``llama-quantize`` makes it)."""
    import torch

    from .reporting.baselines import PRESETS, llama_cpp_plan
    from .solvers.uniform import UniformSolver
    problem = problem_of(table, plan)
    out = {}
    uniform = UniformSolver().solve(problem)
    if "note" not in uniform.extra:
        out[f"uniform {next(iter(uniform.layers.values())).label()}"] = uniform
    if any(o.ggml for o in table.options):
        index = {o: j for j, o in enumerate(table.options)}
        fitting = []
        for preset in PRESETS:
            mix = llama_cpp_plan(preset, table)
            choice = torch.tensor([index[mix.layers[u.name]] for u in table.units])
            if problem.fits(choice):
                fitting.append((problem.total(choice)[1], preset, choice))
        if fitting:
            _, preset, choice = max(fitting)
            out[f"llama.cpp {preset}"] = problem.plan(choice, f"llama.cpp {preset}")
    return out


def check_widths(table, plan: BitPlan, fitness, windows: int = REFINE_WINDOWS, *, compare: bool = True) -> BitPlan:
    """``plan``, or the best on ``fitness`` of the plans solved without widths below ⌊budget⌋ and below
    ⌊budget⌋ − 1 (``without_low_widths``; at 4.5 bpw in ggml types: no Q2_K/Q3_K, then no Q2_K) and, with
    ``compare``, of the ``alternatives`` at the same budget: the plan returned is never worse on the fitness."""
    top = int(plan.budget_bits)
    candidates: dict = {}
    for floor in (top, top - 1):
        if floor >= 3:
            other = without_low_widths(table, plan, floor)
            if other is not None and not any(_same(other, c) for c in candidates.values()):
                candidates[f"no widths below {floor} bits"] = other
    others = {name: p for name, p in (alternatives(table, plan) if compare else {}).items()
              if not _same(p, plan) and not any(_same(p, c) for c in candidates.values())}
    if not candidates and not others:
        return plan
    scored = {"the plan": plan, **candidates, **others}
    kls, early = _race(table, scored, fitness, windows)
    kl_plan = kls.pop("the plan")
    # how the record names each plan: a floor candidate by its field, an alternative by its name
    field = {name: "without_low_widths_kl" if name.endswith(f" {top} bits") else
             f"without_below_{name.split()[-2]}_kl" for name in candidates}
    checked = {"kl": kl_plan, "floor_bits": top, "windows": windows,
               "held_out": bool(getattr(fitness, "held_out", False)),
               **{field[name]: kls[name] for name in candidates},
               **({"alternatives": {name: kls[name] for name in others}} if others else {}),
               **({"early": {field.get(name, name): n for name, n in early.items()}} if early else {})}
    kls = {name: kl for name, kl in kls.items() if name not in early}
    best = min(kls, key=kls.get) if kls else None
    if best is None or kl_plan <= kls[best]:
        plan.extra["width_check"] = checked
        return plan
    other = {**candidates, **others}[best]
    for key in ("granularity", "row_check", "count_overhead", "fuse"):
        if key in plan.extra:
            other.extra.setdefault(key, plan.extra[key])
    other.extra["width_check"] = dict(checked, chosen=best)
    return other


RACE_FACTOR = 1.5      # a candidate whose KL on the first quarter of the windows passes the best's by this factor
                       # is not scored on the rest (Gemma-3-270M at Q2_K's size: uniform Q5_K 0.157 and the Q3_K_S
                       # mix 0.677 on 2 windows, the plan 0.036 on all 8)


def _race(table, scored: dict, fitness, windows: int) -> tuple[dict, dict]:
    """Each plan's KL on ``windows`` windows, except that plans far behind the best on the first quarter of them
    stop there (``early``: name -> windows scored; their KL is that of those windows). "the plan" is always scored in full. A fitness that cannot
    resume (``resumable``) scores every plan on all windows."""
    from tqdm.auto import tqdm
    windows = min(windows, getattr(fitness, "max_windows", windows))
    first = max(1, windows // 4) if getattr(fitness, "resumable", False) and windows >= 4 else windows
    kls, early = {}, {}
    with tqdm(desc="check", total=len(scored) * windows, leave=False) as bar:
        for name, p in scored.items():
            kls[name] = fitness(_choice(table, p), first)
            bar.update(first)
        if first == windows:
            return kls, early
        best = min(kls.values())
        for name, p in scored.items():
            if name != "the plan" and kls[name] > RACE_FACTOR * best:
                early[name] = first
                continue
            rest = fitness(_choice(table, p), windows, first=first)
            kls[name] = (kls[name] * first + rest * (windows - first)) / windows
            bar.update(windows - first)
    return kls, early


def refine_plan(table, plan: BitPlan, fitness, seconds: float, *, progress: bool = True, seed: int = 0,
                windows: int = REFINE_WINDOWS) -> BitPlan:
    """``plan`` after ``seconds`` of the EvoPress search (never worse on the fitness than ``plan``)."""
    from .solvers.refine import refine
    stages = ((max(1, windows // 4), 3), (windows, 1))
    return refine(problem_of(table, plan), plan, fitness, seconds=seconds, stages=stages, progress=progress, seed=seed)
