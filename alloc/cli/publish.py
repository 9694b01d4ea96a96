"""Commands that turn a plan into something else: export (another tool's config) and report (HTML/Markdown)."""
from __future__ import annotations

from .. import checks
from ..errors import BitallocError


def cmd_export(args) -> None:
    from ..export import FORMATS, export
    from ..files import atomic_write_text
    from ..plan import BitPlan
    if args.to not in FORMATS:
        raise BitallocError(f"unknown export format {args.to!r}: choose one of {', '.join(FORMATS)}")
    checks.input_file(args.plan, "plan", "plan JSON")
    checks.output_file(args.out)
    plan = BitPlan.load(args.plan)
    text = export(plan, args.to, exact=args.exact)   # warnings print as one line each (main)
    atomic_write_text(args.out, text)
    print(f"{args.to} config for {len(plan.layers)} layers written to {args.out}")


def cmd_report(args) -> None:
    import contextlib

    from ..files import atomic_path, atomic_write_text
    from ..plan import BitPlan
    from ..reporting.report import charts, render, render_markdown
    from ..sensitivity.table import SensitivityTable
    checks.require("matplotlib", "plots", "bitalloc report")
    checks.input_file(args.plan, "plan", "plan JSON")
    if args.table:
        checks.input_file(args.table, "--table", "table CSV (from bitalloc probe --out)")
    out = checks.output_file(args.out)
    plan = BitPlan.load(args.plan)
    table = SensitivityTable.load_csv(args.table) if args.table else None
    if out.suffix.lower() not in (".md", ".markdown"):
        atomic_write_text(out, render(plan, table))
        print(f"report written to {out}")
        return
    pngs = charts(plan, table)
    names = {k: f"{out.stem}.{k}.png" for k in pngs}
    with contextlib.ExitStack() as stack:  # the page and its charts appear together or not at all
        for k, data in pngs.items():
            stack.enter_context(atomic_path(out.parent / names[k])).write_bytes(data)
        atomic_write_text(out, render_markdown(plan, names))
    print(f"report written to {out} (charts: {', '.join(names.values())})")
