"""Charts (matplotlib, PNG, headless): per-layer widths, the cost table, the budget/perplexity Pareto front."""
from __future__ import annotations

import re
from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """Write the figure whole or not at all (a temporary file renamed onto ``path``)."""
    from ..files import atomic_path
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return Path(path)


MAX_HEAT_ROWS, MAX_HEAT_COLS = 200, 40     # a heat map past these is unreadable (and a crafted plan costs no memory)


def _split(name: str) -> tuple[str, str]:
    """("layer index", "projection") of a module name, e.g. model.layers.3.mlp.up_proj -> ("3", "mlp.up_proj")."""
    m = re.search(r"\.(\d+)\.(.+)$", name)
    return (m.group(1), m.group(2)) if m else ("-", name)


def bits_heatmap(plan, path: str | Path) -> Path:
    """Layers (rows) x projection type (columns), coloured by true bits per weight, annotated with the format."""
    plt = _plt()
    rows: dict[str, int] = {}
    cols: dict[str, int] = {}
    for n in plan.layers:
        r, c = _split(n)
        if r not in rows and len(rows) < MAX_HEAT_ROWS:
            rows[r] = len(rows)
        if c not in cols and len(cols) < MAX_HEAT_COLS:
            cols[c] = len(cols)
    shown = [n for n in plan.layers if _split(n)[0] in rows and _split(n)[1] in cols]
    import numpy as np
    grid = np.full((len(rows), len(cols)), np.nan, dtype=np.float32)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 0.8 + 0.32 * len(rows)))
    cells = []
    for n in shown:
        r, c = _split(n)
        i, j = rows[r], cols[c]
        grid[i, j] = plan.layer_size_bits(n) / (plan.shapes[n][0] * plan.shapes[n][1])
        cells.append((i, j, plan.format_label(n)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, j, label in cells:  # white on the dark (low-bit) end of viridis, black elsewhere
        colour = "white" if im.norm(grid[i, j]) < 0.45 else "black"
        ax.text(j, i, label, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(len(cols)), list(cols), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), list(rows), fontsize=8)
    ax.set_ylabel("layer")
    budget = f", budget {plan.budget_bits:g}" if plan.budget_bits is not None else ""
    part = f"; {len(shown):,} of {len(plan.layers):,} layers shown" if len(shown) < len(plan.layers) else ""
    ax.set_title(f"bits per layer ({plan.solver}{budget}, true {plan.true_bpw:.4f} bpw{part})")
    fig.colorbar(im, ax=ax, label="true bits/weight")
    return _save(plt, fig, path)


def row_width_bars(plan, path: str | Path) -> Path:
    """A row plan: one stacked bar per layer, the share of its output rows at each width."""
    plt = _plt()
    names = list(plan.layers)
    widths = sorted({b for n in names for b in plan.row_widths(n)})
    fig, ax = plt.subplots(figsize=(6, 1 + 0.16 * len(names)))
    left = [0.0] * len(names)
    cmap = plt.get_cmap("viridis")
    for k, b in enumerate(widths):
        share = [plan.row_widths(n).get(b, 0) / plan.shapes[n][0] for n in names]
        ax.barh(range(len(names)), share, left=left, color=cmap(k / max(len(widths) - 1, 1)), label=f"{b}-bit rows")
        left = [a + c for a, c in zip(left, share)]
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's output rows")
    ax.set_title(f"widths inside each layer ({plan.solver}, true {plan.true_bpw:.4f} bpw)")
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def cost_heatmap(table, path: str | Path) -> Path:
    """Units (rows) x options (columns), log10 of the probe's cost."""
    plt = _plt()
    import numpy as np
    cost = np.log10(np.clip(table.cost.double().numpy(), 1e-30, None))
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(table.options), 1 + 0.18 * len(table.units)))
    im = ax.imshow(cost, cmap="magma_r", aspect="auto")
    ax.set_xticks(range(len(table.options)), [o.label() for o in table.options], fontsize=8)
    ax.set_yticks(range(len(table.units)), [u.name for u in table.units], fontsize=5)
    source = table.meta.get("source")
    what = f"costs from {Path(source).name}" if table.probe == "csv" and source else f"{table.probe} probe costs"
    ax.set_title(f"{what} per unit and format")
    ax.set_xlabel("format")
    fig.colorbar(im, ax=ax, label="log10 cost (estimated loss increase)")
    return _save(plt, fig, path)


ZOOM_BPW = 5.5      # the x axis stops here; wider uniform plans (W8) are listed in a note, not plotted


def pareto_plot(points: list[dict], uniform: list[dict], path: str | Path, fp: float | None = None,
                baselines: list[dict] = (), title: str = "bitalloc plans vs uniform widths",
                ylabel: str = "perplexity (log scale)") -> Path:
    """Allocated plans, uniform plans and baseline mixes (e.g. llama.cpp's): true bpw (x) vs perplexity
    (y, log scale). Plans solved at a baseline's own bits (label "=Q3_K_M") are drawn as open diamonds beside
    their baseline; the x axis stops at ZOOM_BPW so W8 does not squeeze the 2–5 bpw range (a note gives it)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    inside = [p for p in uniform if p["true_bpw"] <= ZOOM_BPW]
    outside = [p for p in uniform if p["true_bpw"] > ZOOM_BPW]
    u = sorted(inside, key=lambda p: p["true_bpw"])
    ax.plot([p["true_bpw"] for p in u], [p["ppl"] for p in u], "s--", color="gray", label="uniform")
    for p in u:
        ax.annotate(p["label"], (p["true_bpw"], p["ppl"]), fontsize=7, color="gray", textcoords="offset points",
                    xytext=(4, 4))
    curve = sorted((p for p in points if not str(p["label"]).startswith("=")), key=lambda p: p["true_bpw"])
    same_bits = [p for p in points if str(p["label"]).startswith("=")]
    ax.plot([p["true_bpw"] for p in curve], [p["ppl"] for p in curve], "o-", color="C0", label="bitalloc plans")
    if same_bits:
        ax.plot([p["true_bpw"] for p in same_bits], [p["ppl"] for p in same_bits], "D", mfc="none", color="C0",
                label="bitalloc at a mix's bits")
    if baselines:
        ax.plot([p["true_bpw"] for p in baselines], [p["ppl"] for p in baselines], "^", color="C3",
                label="llama.cpp mixes")
        for k, p in enumerate(sorted(baselines, key=lambda p: p["true_bpw"])):
            # labels below the marker, alternating left and right so neighbours (Q3_K_S, Q3_K_M) do not overlap
            ax.annotate(p["label"], (p["true_bpw"], p["ppl"]), fontsize=7, color="C3", textcoords="offset points",
                        xytext=(6 if k % 2 == 0 else -6, -12), ha="left" if k % 2 == 0 else "right")
    if fp is not None:
        ax.axhline(fp, color="C2", lw=0.8, label=f"fp ({fp:.2f})")
    if outside:
        note = ", ".join(f"{p['label']} {p['true_bpw']:.2f} bpw: {p['ppl']:.4g}" for p in outside
                         if p["ppl"] is not None)
        ax.text(0.99, 0.99, f"not shown: {note}", transform=ax.transAxes, fontsize=7, ha="right", va="top",
                color="gray")
    ax.set_title(title)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 12, 14, 20 rather than 1.2×10¹
    ax.yaxis.set_major_formatter(plain)
    values = [p["ppl"] for p in [*u, *curve, *same_bits, *baselines] if p.get("ppl")]
    if values and max(values) < 10 * min(values):       # within a decade: label the minor ticks too
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("true bits per weight")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)
