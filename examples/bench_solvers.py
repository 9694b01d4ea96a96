"""Solver timings and the closed form's gap to the exact ILP (issue #4's acceptance figures).

    python examples/bench_solvers.py [--table fisher.csv]

1. ilp on 224 units x 8 options (a 32-layer Llama's 7 projections, widths 2,3,4,5,6,8 and 3g64, 4g64).
2. closed_form's core on 10^6 units x 4 options (arrays; building a SensitivityTable of 10^6 named units is
   not part of the solver).
3. closed_form vs ilp objective on a per-layer table (--table: a `bitalloc probe` CSV) at several budgets.
"""
from __future__ import annotations

import argparse
import time

import torch

from bitalloc.options import QuantSpec
from bitalloc.sensitivity.table import SensitivityTable
from bitalloc.solvers import get_solver
from bitalloc.solvers.closed_form import closed_form_choice
from bitalloc.units import Unit

SHAPES = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
          "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}


def llama_table(seed: int = 0) -> SensitivityTable:
    g = torch.Generator().manual_seed(seed)
    units = [Unit(f"model.layers.{i}.{p}", s, "linear") for i in range(32) for p, s in SHAPES.items()]
    options = [QuantSpec(b) for b in (2, 3, 4, 5, 6, 8)] + [QuantSpec(3, 64), QuantSpec(4, 64)]
    bpw = torch.tensor([o.bits_per_weight((4096, 4096)) for o in options], dtype=torch.float64)
    scale = torch.rand(len(units), 1, generator=g, dtype=torch.float64) * 10
    alpha = 1.5 + torch.rand(len(units), 1, generator=g, dtype=torch.float64)
    cost = scale * 2.0 ** (-alpha * bpw) * (1 + 0.05 * torch.rand(len(units), len(options), generator=g))
    return SensitivityTable(units, options, cost, {"probe": "synthetic"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", help="a per-layer table CSV from `bitalloc probe` for the gap figures")
    args = ap.parse_args()

    table = llama_table()
    ilp = get_solver("ilp")
    ilp(table, 3.0)                                                  # warm (PuLP import, CBC start)
    times = []
    for budget in (2.5, 3.0, 3.5, 4.25):
        t0 = time.perf_counter()
        plan = ilp(table, budget)
        times.append(time.perf_counter() - t0)
        print(f"ilp 224x8 @ {budget}: {times[-1]:.3f} s, true {plan.true_bpw:.4f}, status {plan.extra['status']}")
    print(f"ilp 224 units x 8 options: max {max(times):.3f} s over 4 budgets")

    U = 1_000_000
    g = torch.Generator().manual_seed(1)
    numel = torch.full((U,), 128.0 * 128, dtype=torch.float64)       # per-group units (e.g. 128x128 tiles)
    bpw = torch.tensor([QuantSpec(b).bits_per_weight((128, 128)) for b in (2, 3, 4, 8)], dtype=torch.float64)
    size = numel[:, None] * bpw
    alpha = 1.5 + torch.rand(U, 1, generator=g, dtype=torch.float64)
    cost = torch.rand(U, 1, generator=g, dtype=torch.float64) * 2.0 ** (-alpha * bpw)
    for budget in (2.5, 3.25):
        t0 = time.perf_counter()
        choice = closed_form_choice(cost, size, numel, budget * float(numel.sum()))
        dt = time.perf_counter() - t0
        used = float(size[torch.arange(U), choice].sum() / numel.sum())
        print(f"closed_form 10^6 units x 4 options @ {budget}: {dt:.3f} s, true {used:.5f} bits/weight")

    tables = [("synthetic 224x8", table)]
    if args.table:
        tables.append((args.table, SensitivityTable.load_csv(args.table)))
    for label, t in tables:
        gaps = []
        for budget in (2.25, 2.5, 3.0, 3.25, 3.5, 4.0):
            a = get_solver("ilp")(t, budget)
            b = get_solver("closed_form")(t, budget)
            gap = b.objective / a.objective - 1
            gaps.append(gap)
            print(f"gap {label} @ {budget}: ilp {a.objective:.6g}, closed_form {b.objective:.6g} ({100 * gap:+.2f} %)")
        print(f"closed_form gap to ilp on {label}: max {100 * max(gaps):.2f} %, mean {100 * sum(gaps) / len(gaps):.2f} %")


if __name__ == "__main__":
    main()
