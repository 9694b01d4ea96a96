"""``bitalloc report``: one self-contained HTML page (charts inlined as base64 PNG) for a plan."""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from .plan import BitPlan


def _img(path: Path) -> str:
    return f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def render(plan: BitPlan, table=None) -> str:
    from .plots import bits_heatmap, cost_heatmap
    with tempfile.TemporaryDirectory() as tmp:
        charts = [_img(bits_heatmap(plan, Path(tmp) / "bits.png"))]
        if table is not None:
            charts.append(_img(cost_heatmap(table, Path(tmp) / "cost.png")))
    model = plan.model.get("id", "model") if isinstance(plan.model, dict) else str(plan.model)
    counts: dict[str, int] = {}
    for s in plan.layers.values():
        counts[s.label()] = counts.get(s.label(), 0) + 1
    summary = [("model", model), ("solver", plan.solver), ("probe", plan.probe or "-"),
               ("budget (bits/weight)", f"{plan.budget_bits}"), ("true bits/weight", f"{plan.true_bpw:.4f}"),
               ("nominal bits/weight", f"{plan.nominal_bpw:.4f}"), ("layers", str(len(plan.layers))),
               ("weights", f"{plan.n_params:,}"), ("packed size", f"{plan.size_bytes() / 2**20:.2f} MiB"),
               ("formats", ", ".join(f"{k} × {v}" for k, v in sorted(counts.items())))]
    for k, v in (plan.extra.get("eval") or {}).items():
        summary.append((f"eval: {k}", ", ".join(f"{m} {x:.4f}" for m, x in v.items())))
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{plan.shapes[n][0]}×{plan.shapes[n][1]}</td>"
                   f"<td>{s.label()}</td><td>{s.bits_per_weight(tuple(plan.shapes[n])):.3f}</td></tr>"
                   for n, s in plan.layers.items())
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bitalloc plan: {html.escape(model)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>bitalloc plan: {html.escape(model)}</h1><h2>Summary</h2><table>{head}</table>
<h2>Charts</h2>{''.join(charts)}
<h2>Per-layer widths</h2><table><tr><th>layer</th><th>out×in</th><th>format</th><th>true bpw</th></tr>{rows}</table>
</body></html>
"""
