"""``bitalloc report``: a page a person reads for one plan — summary, charts, per-layer table.

HTML (the default) is one self-contained file, charts inlined as base64 PNG. Markdown (``--out x.md``) links
its charts, which are written beside it as ``x.bits.png`` (and ``x.cost.png`` with a table)."""
from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from ..plan import BitPlan


def charts(plan: BitPlan, table=None) -> dict[str, bytes]:
    """PNG bytes by chart name: "bits" (layers × projection heat map), "rows" for a row plan (each layer's
    share of rows at each width, stacked bars) and, given a table, "cost"."""
    from .plots import bits_heatmap, cost_heatmap, row_width_bars
    with tempfile.TemporaryDirectory() as tmp:
        out = {"bits": bits_heatmap(plan, Path(tmp) / "bits.png").read_bytes()}
        if plan.row_bits:
            out["rows"] = row_width_bars(plan, Path(tmp) / "rows.png").read_bytes()
        if table is not None:
            out["cost"] = cost_heatmap(table, Path(tmp) / "cost.png").read_bytes()
    return out


def _model_id(plan: BitPlan) -> str:
    return plan.model.get("id", "model") if isinstance(plan.model, dict) else str(plan.model)


def summary(plan: BitPlan) -> list[tuple[str, str]]:
    counts: dict[str, int] = {}
    for n in plan.layers:
        counts[plan.format_label(n)] = counts.get(plan.format_label(n), 0) + 1
    rows = [("model", _model_id(plan)), ("solver", plan.solver), ("probe", plan.probe or "-"),
            ("budget (bits/weight)", f"{plan.budget_bits}"), ("true bits/weight", f"{plan.true_bpw:.4f}"),
            ("nominal bits/weight", f"{plan.nominal_bpw:.4f}"), ("layers", str(len(plan.layers))),
            ("weights", f"{plan.n_params:,}"), ("packed size", f"{plan.size_bytes() / 2**20:.2f} MiB"),
            ("formats", ", ".join(f"{k} × {v}" for k, v in sorted(counts.items())))]
    for k, v in (plan.extra.get("eval") or {}).items():
        rows.append((f"eval: {k}", ", ".join(f"{m} {x:.4f}" for m, x in v.items())))
    return rows


def layer_rows(plan: BitPlan) -> list[tuple[str, str, str, str]]:
    """(layer, out×in, format, true bpw) per planned layer."""
    return [(r["layer"], f"{plan.shapes[r['layer']][0]}×{plan.shapes[r['layer']][1]}", r["format"], f"{r['bpw']:.3f}")
            for r in plan.table()]


def render(plan: BitPlan, table=None) -> str:
    """The HTML page, charts inlined."""
    model = html.escape(_model_id(plan))
    imgs = "".join(f'<img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}">'
                   for k, v in charts(plan, table).items())
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary(plan))
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in layer_rows(plan))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>bitalloc plan: {model}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>bitalloc plan: {model}</h1><h2>Summary</h2><table>{head}</table>
<h2>Charts</h2>{imgs}
<h2>Per-layer widths</h2><table><tr><th>layer</th><th>out×in</th><th>format</th><th>true bpw</th></tr>{rows}</table>
</body></html>
"""


def render_markdown(plan: BitPlan, chart_files: dict[str, str]) -> str:
    """The Markdown page; ``chart_files`` maps chart name to the PNG's path relative to the page."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    lines = [f"# bitalloc plan: {cell(_model_id(plan))}", "", "## Summary", "", "| | |", "|---|---|"]
    lines += [f"| {cell(k)} | {cell(v)} |" for k, v in summary(plan)]
    lines += ["", "## Charts", ""] + [f"![{k}]({v})" for k, v in chart_files.items()]
    lines += ["", "## Per-layer widths", "", "| layer | out×in | format | true bpw |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in layer_rows(plan)]
    return "\n".join(lines) + "\n"
