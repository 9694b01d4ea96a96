"""The ``bitalloc`` command. Each subcommand is one step of the flow in DESIGN.md; ``allocate`` runs them all.

Errors in the user's input print one line (``bitalloc: error: ...``) and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .errors import BitallocError, BitallocWarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"bitalloc: warning: {message}" if issubclass(category, BitallocWarning) else
          warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


def _budget(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget {text!r} is not a number of bits per weight, e.g. 3.2") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face model folder (default: the embedded refllama-s)")
    p.add_argument("--calib", help="calibration text file (default: Python's own help topics)")
    p.add_argument("--options", help="candidate widths, e.g. 2,3,4,8 or 3g64 (default 2,3,4,8 at --group-size)")
    p.add_argument("--group-size", type=int, default=128, help="weights per scale along the input (default 128)")
    p.add_argument("--symmetric", action="store_true", help="symmetric codes (no zero points)")
    p.add_argument("--include", default="", help="also quantize these modules (comma list of names or globs, e.g. lm_head)")
    p.add_argument("--exclude", default="", help="keep these modules in full precision (comma list of names or globs)")
    p.add_argument("--experts", default="per-expert", choices=["per-expert", "per-layer"],
                   help="MoE models: a width per expert, or one per layer for all its experts (default per-expert)")
    _add_dtype_arg(p)
    p.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="fisher, kfac, output_error: one decoder block at a time (auto: when the whole-model "
                        "state would pass 1 GiB, or the weights stay on the host for a GPU)")
    p.add_argument("--seq-len", type=int, default=512, help="calibration window length in tokens (default 512)")
    p.add_argument("--n-windows", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the sensitivity-table cache")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


STREAMING_PROBES = ("fisher", "kfac", "output_error")


def _probe_settings(args) -> dict:
    """--stream for the probes that can run one decoder block at a time (fisher, kfac, output_error)."""
    if args.stream != "auto" and args.probe not in STREAMING_PROBES:
        raise BitallocError(f"--stream {args.stream} applies to the fisher, kfac and output_error probes only, "
                            f"not {args.probe}: leave it out")
    return {"stream": args.stream} if args.probe in STREAMING_PROBES else {}


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype to load the model in (default auto: the checkpoint's own)")


def _list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _prepare(args, strict: bool = False):
    import torch
    from .api import prepare
    from .options import parse_options
    options = parse_options(args.options, group_size=args.group_size, symmetric=args.symmetric)
    prepared = prepare(args.model, calib_file=args.calib, options=options, include=_list(args.include),
                       seq_len=args.seq_len, n_windows=args.n_windows, strict_windows=strict, experts=args.experts,
                       exclude=_list(args.exclude), dtype=args.dtype)
    from .distributed import local_device
    device = local_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BitallocError("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    if device.startswith("cuda") and _weights_stay_on_host(args, prepared.model, device):
        prepared.compute_device = device        # fisher streams one block at a time to the GPU
    else:
        prepared.model.to(device)
    return prepared


def _weights_stay_on_host(args, model, device: str) -> bool:
    """On a GPU, the streaming probes keep the weights on the host and stream blocks to the device with
    --stream on, or (auto) when the model takes more than 80 % of the GPU's free memory."""
    import torch
    if getattr(args, "probe", None) not in STREAMING_PROBES or getattr(args, "stream", "auto") == "off":
        return False
    if args.stream == "on":
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 0.8 * free


def _print_plan(plan, table) -> None:
    index = {u.name: i for i, u in enumerate(table.units)}
    width = max(len(n) for n in plan.layers)
    print(f"{'layer':<{width}}  {'params':>9}  {'format':>8}  {'bpw':>6}  {'cost':>10}")
    for name, spec in plan.layers.items():
        shape = plan.shapes[name]
        j = table.options.index(spec)
        cost = float(table.cost[index[name], j])
        print(f"{name:<{width}}  {shape[0] * shape[1]:>9,}  {spec.label():>8}  "
              f"{spec.bits_per_weight(shape):>6.3f}  {cost:>10.4g}")


def _solver_settings(args, prepared) -> dict:
    """--generations/--time-limit/--seed for the search solvers, plus their KL fitness on the model."""
    from .api import with_fitness
    settings = {}
    if args.solver == "evolutionary":
        settings = {"generations": args.generations, "time_limit": args.time_limit, "seed": args.seed}
    elif args.solver == "optuna":
        settings = {"n_trials": args.generations, "timeout": args.time_limit, "seed": args.seed}
    return with_fitness(prepared, args.solver, settings)


def _add_search_solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generations", type=int, default=50,
                   help="evolutionary: generations (optuna: trials) (default 50)")
    p.add_argument("--time-limit", type=float, default=None, help="evolutionary/optuna: stop after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search solvers (default 0)")


def cmd_allocate(args) -> None:
    from .api import measure, solve
    t0 = time.time()
    prepared = _prepare(args)
    table = measure(prepared, args.probe, settings=_probe_settings(args), cache=not args.no_cache)
    plan = solve(table, args.budget, args.solver, settings=_solver_settings(args, prepared),
                 count_overhead=not args.nominal, fuse=args.fuse)
    plan.extra["quantizer"] = args.quantizer
    _print_plan(plan, table)
    print(f"\nbudget {args.budget} {'nominal' if args.nominal else 'true'} bits/weight · "
          f"true {plan.true_bpw:.4f} · nominal {plan.nominal_bpw:.4f} · probe {plan.probe} · solver {plan.solver}"
          f" · {len(plan.layers)} layers, {plan.n_params:,} weights, {plan.size_bytes() / 2**20:.2f} MiB packed")
    if args.eval:
        _evaluate_plans(args, prepared, table, plan)
    plan.save(args.out)
    print(f"plan written to {args.out} ({time.time() - t0:.1f} s)")


def _evaluate_plans(args, prepared, table, plan) -> None:
    from .api import solve
    from .calibration import read_text, windows
    text = read_text(args.eval)
    tokens = windows(prepared.tokenizer, text, seq_len=prepared.tokens.shape[1], n_windows=args.eval_windows,
                     source=f"eval file {args.eval!r}")
    uniform = solve(table, args.budget, "uniform", count_overhead=not args.nominal)
    plans = [("plan", plan), (f"uniform {next(iter(uniform.layers.values())).label()}", uniform)]
    from .evaluate import score_plans
    rows = score_plans(prepared, tokens, plans, args.quantizer, getattr(args, "stream", "auto"))
    print()
    _print_scores(rows, prepared.kind, tokens, args.quantizer)
    plan.extra["eval"] = {label: s.as_dict() for label, _, s in rows}


def _print_scores(rows, kind: str, tokens, quantizer: str) -> None:
    """One line per (label, plan or None for fp, Score): true bpw, perplexity (or cosine) and KL to fp."""
    metric = "ppl" if kind == "causal_lm" else "cosine"
    print(f"{'model':<18} {'true bpw':>9} {metric:>9} {'KL':>8}   ({len(tokens)} windows of {tokens.shape[1]} "
          f"tokens, {quantizer})")
    for label, p, s in rows:
        bpw = f"{p.true_bpw:.4f}" if p else "16"
        value = s.ppl if metric == "ppl" else s.cosine
        kl = f"{s.kl:.5f}" if s.kl is not None else "-"
        print(f"{label:<18} {bpw:>9} {value:>9.4f} {kl:>8}")


def cmd_probe(args) -> None:
    from .api import measure
    from .distributed import world
    from .files import check_parent
    check_parent(args.out)
    rank, size = world()
    prepared = _prepare(args, strict=True)
    t0 = time.time()
    if size > 1:                 # under torchrun: every rank measures its share, rank 0 writes
        from .distributed import init, measure_distributed
        init(str(next(prepared.model.parameters()).device))
        table = measure_distributed(prepared, args.probe, _probe_settings(args), cache=not args.no_cache)
        if rank != 0:
            return
    else:
        table = measure(prepared, args.probe, settings=_probe_settings(args), cache=not args.no_cache)
    table.save_csv(args.out)
    source = "cache" if "cached" in table.meta else "measured"
    ranks = f", {size} ranks" if size > 1 else ""
    print(f"{args.probe}: {len(table.units)} units × {len(table.options)} options ({source}{ranks}, "
          f"{time.time() - t0:.1f} s) -> {args.out}")


def cmd_solve(args) -> None:
    from .api import solve
    from .sensitivity.table import SensitivityTable
    table = SensitivityTable.load_csv(args.table)
    plan = solve(table, args.budget, args.solver, count_overhead=not args.nominal, fuse=args.fuse)
    _print_plan(plan, table)
    print(f"\ntrue {plan.true_bpw:.4f} · nominal {plan.nominal_bpw:.4f} · objective {plan.objective:.6g}")
    plan.save(args.out)
    print(f"plan written to {args.out}")


def _discard(name, q) -> None:
    """quantize_model sink for fake quantization only: the codes are not needed."""


def cmd_eval(args) -> None:
    from .api import prepare
    from .calibration import read_text, windows
    from .plan import BitPlan
    plan = BitPlan.load(args.plan)
    prepared = prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, dtype=args.dtype,
                       experts=plan.extra.get("experts", "per-expert"))
    plan.check_units(prepared.units)
    tokens = windows(prepared.tokenizer, read_text(args.text), seq_len=args.seq_len, n_windows=args.eval_windows,
                     source=f"eval file {args.text!r}")
    from .evaluate import score_plans
    rows = score_plans(prepared, tokens, [("plan", plan)], args.quantizer, args.stream)
    _print_scores(rows, prepared.kind, tokens, args.quantizer)


def cmd_apply(args) -> None:
    import copy

    from .api import prepare
    from .calibration import read_text, windows
    from .evaluate import perplexity
    from .packed import apply, check_new_folder, checkpoint_report, planned_units, save
    from .plan import BitPlan
    from .quantize_model import quantize_model
    out = check_new_folder(args.out)           # fail before the slow part; save() checks again
    plan = BitPlan.load(args.plan)
    prepared = prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, seq_len=args.seq_len,
                       dtype=args.dtype, experts=plan.extra.get("experts", "per-expert"))
    model = prepared.model
    if args.eval:
        tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=args.seq_len, n_windows=args.eval_windows,
                         source=f"eval file {args.eval!r}")
        fake = copy.deepcopy(model)
        quantize_model(fake, planned_units(fake, plan), plan, quantizer=args.quantizer, calibration=prepared.tokens,
                       sink=_discard)
        ppl_fake = perplexity(fake, tokens, desc="ppl fake-quantized")
        del fake
    apply(model, plan, quantizer=args.quantizer, calibration=prepared.tokens)
    save(model, out, tokenizer=prepared.tokenizer)
    r = checkpoint_report(model, out)
    print(f"packed {len(plan.layers)} layers ({r['quantized_params']:,} params at {r['true_bpw']:.4f} true bpw) "
          f"-> {args.out}\ncheckpoint {r['actual_bytes']:,} bytes; plan predicts {r['expected_bytes']:,.0f} "
          f"({100 * r['relative_diff']:+.2f} %)")
    if args.eval:
        ppl_packed = perplexity(model, tokens, desc="ppl packed")
        print(f"perplexity: packed {ppl_packed:.6f} · fake-quantized {ppl_fake:.6f} · "
              f"relative difference {abs(ppl_packed / ppl_fake - 1):.2e}")


def cmd_search(args) -> None:
    import json

    from .api import measure, with_fitness
    from .files import check_parent
    from .plan import BitPlan
    from .solvers import Problem
    from .solvers.optuna_search import OptunaSolver
    if args.out:
        check_parent(args.out)
    prepared = _prepare(args)
    table = measure(prepared, args.probe, settings=_probe_settings(args), cache=not args.no_cache)
    budget = args.budget if args.budget is not None else 16.0
    problem = Problem(table, budget, count_overhead=not args.nominal, fuse=args.fuse)
    solver = OptunaSolver(n_trials=args.n_trials, study_name=args.study, storage=args.storage, sampler=args.sampler,
                          seed=args.seed, windows=args.windows, heartbeat=args.heartbeat, grace=args.grace,
                          timeout=args.timeout, multi_objective=args.budget is None, trial_delay=args.trial_delay,
                          space=args.space, spread=args.spread,
                          settings={"model": prepared.info["hash"], "probe": args.probe})
    solver.fitness = with_fitness(prepared, "optuna", {}, max_windows=args.windows)["fitness"]
    study = solver.run(problem)
    import optuna
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    print(f"study {args.study!r} on {solver.storage}: {len(complete)} complete trials")
    if args.budget is None:
        print(f"{'true bpw':>9}  {'KL':>9}  trial")
        for t in sorted(study.best_trials, key=lambda t: t.values[0]):
            print(f"{t.values[0]:>9.4f}  {t.values[1]:>9.5f}  {t.number}")
        return
    best = study.best_trial
    plan = BitPlan.from_json(json.loads(best.user_attrs["plan"]))
    print(f"best trial {best.number}: KL {best.value:.5f} · true {plan.true_bpw:.4f} bits/weight")
    if args.out:
        plan.save(args.out)
        print(f"plan written to {args.out}")


def cmd_dashboard(args) -> None:
    from .solvers.optuna_search import make_storage
    storage = make_storage(args.storage)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise BitallocError("the dashboard needs optuna-dashboard: pip install 'bitalloc[search]'") from None
    print(f"optuna-dashboard for {args.storage} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    run_server(storage, host=args.host, port=args.port)


def cmd_export(args) -> None:
    from .export import FORMATS, export
    from .files import atomic_write_text, check_parent
    from .plan import BitPlan
    if args.to not in FORMATS:
        raise BitallocError(f"unknown export format {args.to!r}: choose one of {', '.join(FORMATS)}")
    check_parent(args.out)
    plan = BitPlan.load(args.plan)
    text = export(plan, args.to)                     # warnings print as one line each (main)
    atomic_write_text(args.out, text)
    print(f"{args.to} config for {len(plan.layers)} layers written to {args.out}")


def _parse_budgets(text: str) -> list[float]:
    try:
        if ":" in text:
            lo, hi, step = (float(v) for v in text.split(":"))
            if step <= 0 or hi < lo:
                raise ValueError
            n = int(round((hi - lo) / step))
            return [round(lo + k * step, 6) for k in range(n + 1)]
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BitallocError(f"--budgets {text!r} is not START:STOP:STEP (e.g. 2.25:4.25:0.25) or a comma list") from None


def uniform_curve_at(uniform: list[dict], bpw: float) -> float | None:
    """Perplexity of the uniform curve at ``bpw``: straight line between the two uniform plans around it
    (the piecewise-linear curve drawn in the Pareto plot). None outside the uniform plans' range."""
    pts = sorted((u["true_bpw"], u["ppl"]) for u in uniform if u["ppl"] is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= bpw <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (bpw - x0) / (x1 - x0)
    return None


def cmd_sweep(args) -> None:
    import csv

    from .api import measure, solve
    from .calibration import read_text, windows
    from .files import atomic_path
    from .plan import BitPlan
    budgets = _parse_budgets(args.budgets)
    out = Path(args.out_dir)
    if not out.parent.is_dir():
        raise BitallocError(f"output directory {str(out.parent)!r} does not exist: create it or choose another --out-dir")
    t0 = time.time()
    prepared = _prepare(args)
    table = measure(prepared, args.probe, settings=_probe_settings(args), cache=not args.no_cache)
    settings = _solver_settings(args, prepared)
    plans = [solve(table, b, args.solver, settings=settings, count_overhead=not args.nominal, fuse=args.fuse)
             for b in budgets]
    uniform = [BitPlan.from_choice(table.units, [o] * len(table.units), budget_bits=16.0,
                                   solver="uniform", probe=table.probe, objective=0.0) for o in table.options]
    rows = [{"kind": "plan", "label": f"{p.budget_bits:g}", "budget": p.budget_bits, "true_bpw": p.true_bpw,
             "nominal_bpw": p.nominal_bpw, "objective": p.objective, "ppl": None, "kl": None,
             "uniform_ppl_at_bpw": None} for p in plans]
    rows += [{"kind": "uniform", "label": o.label(), "budget": None, "true_bpw": p.true_bpw,
              "nominal_bpw": p.nominal_bpw, "objective": None, "ppl": None, "kl": None, "uniform_ppl_at_bpw": None}
             for o, p in zip(table.options, uniform)]
    fp = None
    if args.eval:
        tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=args.seq_len, n_windows=args.eval_windows,
                         source=f"eval file {args.eval!r}")
        from .evaluate import score_plans
        scored = score_plans(prepared, tokens, [(row["label"], p) for row, p in zip(rows, plans + uniform)], "rtn",
                              args.stream)
        fp = scored[0][2].ppl
        for row, (_, _, s) in zip(rows, scored[1:]):
            row["ppl"], row["kl"] = s.ppl, s.kl
        for row in rows[:len(plans)]:
            row["uniform_ppl_at_bpw"] = uniform_curve_at(rows[len(plans):], row["true_bpw"])
    out.mkdir(exist_ok=True)
    with atomic_path(out / "sweep.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    def fmt(v):
        return f"{v:.4f}" if v is not None else "-"
    print(f"{'kind':<8} {'label':>6} {'true bpw':>9} {'ppl':>9} {'KL':>8} {'uniform ppl here':>17}")
    for r in rows:
        print(f"{r['kind']:<8} {r['label']:>6} {r['true_bpw']:>9.4f} {fmt(r['ppl']):>9} {fmt(r['kl']):>8} "
              f"{fmt(r['uniform_ppl_at_bpw']):>17}")
    if args.eval:
        compared = [r for r in rows[:len(plans)] if r["uniform_ppl_at_bpw"] is not None]
        below = sum(r["ppl"] <= r["uniform_ppl_at_bpw"] for r in compared)
        print(f"{below} of {len(compared)} plans inside the uniform range are at or below the uniform curve"
              + (f" ({len(plans) - len(compared)} outside it)" if len(compared) < len(plans) else ""))
        from .plots import pareto_plot
        pareto_plot([r for r in rows if r["kind"] == "plan"], [r for r in rows if r["kind"] == "uniform"],
                    out / "pareto.png", fp=fp)
    print(f"sweep of {len(budgets)} budgets -> {out / 'sweep.csv'}" + (f", {out / 'pareto.png'}" if args.eval else "")
          + f" ({time.time() - t0:.1f} s)")


def cmd_report(args) -> None:
    import contextlib

    from .files import atomic_path, atomic_write_text, check_parent
    from .plan import BitPlan
    from .report import charts, render, render_markdown
    from .sensitivity.table import SensitivityTable
    out = check_parent(args.out)
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


def build_parser() -> argparse.ArgumentParser:
    from .api import DEFAULT_PROBE, DEFAULT_SOLVER
    from . import __version__
    parser = argparse.ArgumentParser(prog="bitalloc", description="Mixed-precision bit allocation under a memory budget.")
    parser.add_argument("--version", action="version", version=f"bitalloc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("allocate", help="probe, solve and write a plan (the whole flow)")
    _add_model_args(p)
    p.add_argument("--budget", type=_budget, required=True, help="average TRUE bits per weight (codes+scales+zeros)")
    p.add_argument("--probe", default=DEFAULT_PROBE, help=f"sensitivity probe (default {DEFAULT_PROBE})")
    p.add_argument("--solver", default=DEFAULT_SOLVER, help=f"solver (default {DEFAULT_SOLVER})")
    p.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"], help="quantizer for --eval (default rtn)")
    p.add_argument("--fuse", action="store_true", help="q/k/v and gate/up share one width")
    p.add_argument("--nominal", action="store_true", help="budget counts code bits only (count_overhead=False)")
    p.add_argument("--eval", help="text file: report perplexity of fp, the plan and the best uniform plan")
    p.add_argument("--eval-windows", type=int, default=64, help="eval windows (default 64)")
    p.add_argument("--out", default="plan.json", help="plan JSON to write (default plan.json)")
    _add_search_solver_args(p)
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("probe", help="measure a sensitivity table and write it as CSV")
    _add_model_args(p)
    p.add_argument("--probe", default=DEFAULT_PROBE, help=f"probe name (default {DEFAULT_PROBE})")
    p.add_argument("--out", required=True, help="CSV to write: unit,bits,group_size,symmetric,cost,size_bits,...")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("solve", help="solve a budget from a sensitivity table CSV")
    p.add_argument("--table", required=True)
    p.add_argument("--budget", type=_budget, required=True)
    p.add_argument("--solver", default=DEFAULT_SOLVER)
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--nominal", action="store_true")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("eval", help="perplexity / KL (or embedding cosine) of a plan")
    p.add_argument("--model")
    p.add_argument("--plan", required=True)
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--calib", help="calibration text for GPTQ")
    p.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    _add_dtype_arg(p)
    p.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="score RTN plans one decoder block at a time (auto: when the whole-model copies pass 1 GiB)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("apply", help="quantize and pack a model by a plan; write safetensors + plan JSON")
    p.add_argument("--model", help="local Hugging Face model folder (default: the embedded refllama-s)")
    p.add_argument("--plan", required=True)
    p.add_argument("--out", required=True, help="new folder for the packed checkpoint")
    p.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"])
    p.add_argument("--calib", help="calibration text for GPTQ (default: Python's own help topics)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-windows", type=int, default=128)
    p.add_argument("--eval", help="text file: perplexity of the packed model and of the fake-quantized one")
    p.add_argument("--eval-windows", type=int, default=64)
    _add_dtype_arg(p)
    p.set_defaults(func=cmd_apply)

    from .solvers.optuna_search import DEFAULT_STORAGE
    p = sub.add_parser("search", help="run one worker of an Optuna study over plans (start several to scale out)")
    _add_model_args(p)
    p.add_argument("--study", required=True, help="study name (workers with the same name share it)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE}); "
                   "postgresql://user@host/db for many machines")
    p.add_argument("--n-trials", type=int, default=100, help="the study stops at this many complete trials")
    p.add_argument("--budget", type=_budget, default=None,
                   help="single objective (KL) under this budget; without it: multi-objective (true bpw, KL)")
    p.add_argument("--probe", default=DEFAULT_PROBE,
                   help="the cost table the study starts from: reweighted (reweight space) or used to repair plans "
                        "to the budget (widths space); its ILP plan is trial 0")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"])
    p.add_argument("--space", choices=["reweight", "widths"], default=None,
                   help="reweight (default with --budget): per-layer multipliers on the cost table, each trial the "
                        "exact ILP plan of the reweighted table; widths (default without): one width per layer")
    p.add_argument("--spread", type=float, default=0.3,
                   help="reweight: log-multipliers lie in [-spread, spread] (default 0.3)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows scored per trial (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--nominal", action="store_true")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between heartbeats (default 10)")
    p.add_argument("--grace", type=int, default=30,
                   help="a trial whose worker is silent this long is failed and retried (default 30)")
    p.add_argument("--timeout", type=float, default=None, help="stop this worker after this many seconds")
    p.add_argument("--trial-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--out", help="write the best plan (single-objective studies)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a plan as another tool's config")
    p.add_argument("plan")
    p.add_argument("--to", required=True, help="gptqmodel, llama.cpp or compressed-tensors")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="solve many budgets from one (cached) table; CSV + Pareto plot")
    _add_model_args(p)
    p.add_argument("--budgets", default="2.25:4.25:0.25", help="START:STOP:STEP or a comma list (default 2.25:4.25:0.25)")
    p.add_argument("--probe", default=DEFAULT_PROBE)
    p.add_argument("--solver", default=DEFAULT_SOLVER)
    p.add_argument("--fuse", action="store_true")
    p.add_argument("--nominal", action="store_true")
    p.add_argument("--eval", help="text file: perplexity of every plan and of the uniform plans (Pareto plot)")
    p.add_argument("--eval-windows", type=int, default=32, help="eval windows (default 32)")
    p.add_argument("--out-dir", default="sweep", help="folder for sweep.csv and pareto.png (default ./sweep)")
    _add_search_solver_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="an HTML (or, for --out x.md, Markdown) page with the plan's summary, "
                                      "charts and per-layer table")
    p.add_argument("plan")
    p.add_argument("--table", help="a probe table CSV, for the cost heat map")
    p.add_argument("--out", default="report.html",
                   help="page to write (default report.html); a .md name writes Markdown with the charts beside it")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study storage")
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)             # third-party chatter
            warnings.simplefilter("always", BitallocWarning)         # ours: one line each
            warnings.showwarning = _show_warning
            args.func(args)
    except BitallocError as e:
        print(f"bitalloc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bitalloc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
