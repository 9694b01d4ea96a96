"""What the pages and /pareto draw, from a stored table and plans: the existing charts (reporting/plots.py)
as PNG bytes. Matplotlib is not thread-safe: one chart at a time."""
from __future__ import annotations

import math
import tempfile
import threading
from pathlib import Path

_LOCK = threading.Lock()
PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")


def pareto_points(table, step: float = 0.25) -> dict:
    """Predicted cost (the table's objective) against true bpw: solved plans every ``step`` bits from the
    cheapest plan to 8, each uniform option, and llama.cpp's mixes on the same options."""
    from ..api import solve
    from ..reporting.baselines import llama_cpp_plan
    sizes, numel = table.sizes(), float(table.numels().sum())
    lo, hi = float(sizes.min(1).values.sum()) / numel, float(sizes.max(1).values.sum()) / numel
    budgets = [round(math.ceil(lo / step) * step + k * step, 4) for k in range(int((min(hi, 8.0) - lo) / step) + 1)]
    points = []
    for b in budgets:
        plan = solve(table, b, "ilp")
        points.append({"label": f"{b:g}", "budget_bits": b, "true_bpw": plan.true_bpw, "objective": plan.objective})
    uniform = []
    for j, o in enumerate(table.options):
        uniform.append({"label": o.label(), "true_bpw": float(sizes[:, j].sum()) / numel,
                        "objective": float(table.cost[:, j].sum())})
    mixes = []
    for preset in PRESETS:
        try:
            p = llama_cpp_plan(preset, table)
        except Exception:             # a mix whose widths the options lack: left out
            continue
        mixes.append({"label": preset, "true_bpw": p.true_bpw, "objective": p.objective})
    return {"points": points, "uniform": uniform, "llama.cpp": mixes,
            "y": "predicted cost (sum of the table's costs of the chosen options)"}


def _png(draw) -> bytes:
    with _LOCK, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chart.png"
        draw(path)
        return path.read_bytes()


def pareto_png(points: dict, title: str) -> bytes:
    from ..reporting.plots import pareto_plot
    floor = 1e-12             # log scale: a zero cost (all W8 on a probe that says 0) still draws

    def as_ppl(rows):
        return [{**r, "ppl": max(r["objective"], floor)} for r in rows]
    return _png(lambda path: pareto_plot(as_ppl(points["points"]), as_ppl(points["uniform"]), path,
                                         baselines=as_ppl(points["llama.cpp"]), title=title,
                                         ylabel="predicted cost (log scale)"))


def heatmap_png(plan) -> bytes:
    from ..reporting.plots import bits_heatmap
    return _png(lambda path: bits_heatmap(plan, path))
