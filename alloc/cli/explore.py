"""Commands that explore many plans: sweep (budgets → CSV + Pareto plot), search (an Optuna study), dashboard."""
from __future__ import annotations

import time

from .. import checks
from ..errors import BitallocError
from .common import check_model_args, eval_tokens, prepare_model, probe_settings, solver_settings


def parse_budgets(text: str) -> list[float]:
    try:
        if ":" in text:
            lo, hi, step = (float(v) for v in text.split(":"))
            if step <= 0 or hi < lo:
                raise ValueError
            n = int(round((hi - lo) / step))
            budgets = [round(lo + k * step, 6) for k in range(n + 1)]
        else:
            budgets = [float(v) for v in text.split(",")]
        for b in budgets:
            checks.budget(b)
        return budgets
    except (ValueError, BitallocError):
        raise BitallocError(f"--budgets {text!r} is not START:STOP:STEP (e.g. 2.25:4.25:0.25) or a comma list "
                            "of numbers > 0") from None


def uniform_curve_at(uniform: list[dict], bpw: float) -> float | None:
    """Perplexity of the uniform curve at ``bpw``: straight line between the two uniform plans around it
    (the piecewise-linear curve drawn in the Pareto plot). None outside the uniform plans' range."""
    pts = sorted((u["true_bpw"], u["ppl"]) for u in uniform if u["ppl"] is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= bpw <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (bpw - x0) / (x1 - x0)
    return None


def _row(kind: str, label: str, p, budget=None) -> dict:
    return {"kind": kind, "label": label, "budget": budget, "true_bpw": p.true_bpw, "nominal_bpw": p.nominal_bpw,
            "objective": p.objective if kind == "plan" else None, "ppl": None, "kl": None,
            "uniform_ppl_at_bpw": None, "plan_ppl_same_bits": None}


def cmd_sweep(args) -> None:
    from ..api import measure, solve
    from ..plan import BitPlan
    budgets = parse_budgets(args.budgets)
    out = checks.output_folder(args.out_dir)
    check_model_args(args)
    if args.baselines and not args.eval:
        raise BitallocError("--baselines scores mixes on held-out text: add --eval FILE")
    t0 = time.time()
    prepared = prepare_model(args)
    table = measure(prepared, args.probe, settings=probe_settings(args), cache=not args.no_cache)
    settings = solver_settings(args, prepared)

    def plan_at(budget: float):
        return solve(table, budget, args.solver, settings=settings, count_overhead=not args.nominal, fuse=args.fuse,
                     granularity=args.granularity)
    entries = [(_row("plan", f"{b:g}", p, b), p) for b in budgets for p in [plan_at(b)]]
    uniform = [BitPlan.from_choice(table.units, [o] * len(table.units), budget_bits=16.0,
                                   solver="uniform", probe=table.probe, objective=0.0) for o in table.options]
    entries += [(_row("uniform", o.label(), p), p) for o, p in zip(table.options, uniform)]
    pairs = []                 # (baseline row, the plan solved at the baseline's own true bpw)
    if args.baselines:
        from ..reporting.baselines import baseline_plans
        for name, base in baseline_plans(args.baselines, table, getattr(prepared.model, "config", None)):
            mine = plan_at(base.true_bpw if not args.nominal else base.nominal_bpw)
            pairs.append(((_row(args.baselines, name, base), base), (_row("plan", f"={name}", mine), mine)))
        entries += [e for pair in pairs for e in pair]
    rows = [r for r, _ in entries]
    fp = tokens = None
    out.mkdir(exist_ok=True)
    if args.eval:
        tokens = eval_tokens(prepared, args.eval, args.eval_windows, args.seq_len)
        fp = _score_sweep(args, prepared, table, tokens, entries, out)
        uniform_rows = [r for r in rows if r["kind"] == "uniform"]
        for row in rows:
            if row["kind"] != "uniform":
                row["uniform_ppl_at_bpw"] = uniform_curve_at(uniform_rows, row["true_bpw"])
        for (base, _), (mine, _) in pairs:
            base["plan_ppl_same_bits"] = mine["ppl"]
    _write_csv(out / "sweep.csv", rows)
    _print_sweep(rows, tokens, [(b, m) for (b, _), (m, _) in pairs])
    if args.eval:
        from ..reporting.plots import pareto_plot
        pareto_plot([r for r in rows if r["kind"] == "plan"], [r for r in rows if r["kind"] == "uniform"],
                    out / "pareto.png", fp=fp, baselines=[r for r in rows if r["kind"] == args.baselines],
                    title=f"{prepared.info['id']}: {len(tokens)} windows × {tokens.shape[1]} tokens, RTN")
    print(f"sweep of {len(budgets)} budgets -> {out / 'sweep.csv'}" + (f", {out / 'pareto.png'}" if args.eval else "")
          + f" ({time.time() - t0:.1f} s)")


def _write_csv(path, rows: list[dict]) -> None:
    import csv

    from ..files import atomic_path
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


STATE = "sweep-state.json"


def _score_sweep(args, prepared, table, tokens, entries, out) -> float:
    """Score every plan of the sweep on ``tokens``, writing sweep.csv and sweep-state.json after each one, so a
    killed sweep keeps what it scored and the next run with the same settings goes on from there. fp ppl."""
    import json

    from ..calibration import data_hash
    from ..evaluate import score_plans
    from ..files import atomic_write_text
    key = {"model": prepared.info["hash"], "calibration": data_hash(prepared.tokens), "eval": data_hash(tokens),
           "probe": table.probe, "settings": table.meta.get("settings"), "solver": args.solver,
           "granularity": args.granularity, "nominal": args.nominal, "fuse": args.fuse,
           "plans": [[r["label"], round(p.true_bpw, 6)] for r, p in entries]}
    key = json.loads(json.dumps(key, default=str))
    state = {"key": key, "fp": None, "scored": {}}
    try:
        old = json.loads((out / STATE).read_text(encoding="utf-8"))
        if old.get("key") == key:
            state = old
    except (OSError, ValueError):
        pass
    rows = [r for r, _ in entries]
    for row in rows:
        got = state["scored"].get(row["label"] + "|" + row["kind"])
        if got:
            row["ppl"], row["kl"] = got
    todo = [(r, p) for r, p in entries if r["ppl"] is None]
    if state["scored"]:
        print(f"sweep: {len(rows) - len(todo)} of {len(rows)} plans already scored in {out / STATE}: going on with "
              f"the other {len(todo)}")
    if not todo and state["fp"] is not None:
        return state["fp"]
    pending = [r for r, _ in todo]

    def each(scored_row):
        label, _, s = scored_row
        if scored_row[1] is None:                 # the fp row comes first
            state["fp"] = s.ppl
        else:
            row = pending.pop(0)
            row["ppl"], row["kl"] = s.ppl, s.kl
            state["scored"][row["label"] + "|" + row["kind"]] = [s.ppl, s.kl]
            done = len(rows) - len(pending)
            print(f"sweep: {done} of {len(rows)} plans scored ({row['kind']} {row['label']}: ppl {s.ppl:.4f})",
                  flush=True)
        _write_csv(out / "sweep.csv", rows)
        atomic_write_text(out / STATE, json.dumps(state))
    score_plans(prepared, tokens, [(r["label"], p) for r, p in todo], "rtn", args.stream, each=each)
    return state["fp"]


def _print_sweep(rows: list[dict], tokens, pairs: list[tuple[dict, dict]]) -> None:
    def fmt(v):
        return f"{v:.4f}" if v is not None else "-"
    kind_w = max(8, *(len(r["kind"]) for r in rows))
    label_w = max(6, *(len(r["label"]) for r in rows))
    windows = f"   ({len(tokens)} windows of {tokens.shape[1]} tokens, rtn)" if tokens is not None else ""
    print(f"{'kind':<{kind_w}} {'label':>{label_w}} {'true bpw':>9} {'ppl':>9} {'KL':>8} {'uniform ppl here':>17}"
          f"{windows}")
    for r in rows:
        print(f"{r['kind']:<{kind_w}} {r['label']:>{label_w}} {r['true_bpw']:>9.4f} {fmt(r['ppl']):>9} "
              f"{fmt(r['kl']):>8} {fmt(r['uniform_ppl_at_bpw']):>17}")
    if tokens is None:
        return
    plans = [r for r in rows if r["kind"] == "plan" and not r["label"].startswith("=")]
    compared = [r for r in plans if r["uniform_ppl_at_bpw"] is not None]
    below = sum(r["ppl"] <= r["uniform_ppl_at_bpw"] for r in compared)
    print(f"{below} of {len(compared)} plans inside the uniform range are at or below the uniform curve"
          + (f" ({len(plans) - len(compared)} outside it)" if len(compared) < len(plans) else ""))
    for base, mine in pairs:
        change = 100 * (1 - mine["ppl"] / base["ppl"])
        word = "lower" if change >= 0 else "higher"
        print(f"{base['kind']} {base['label']} at {base['true_bpw']:.4f} true bpw: ppl {base['ppl']:.4f}; bitalloc "
              f"at {mine['true_bpw']:.4f}: {mine['ppl']:.4f} ({abs(change):.1f} % {word}), KL {base['kl']:.4f} → "
              f"{mine['kl']:.4f}")


def cmd_search(args) -> None:
    import json

    from ..api import measure, with_fitness
    from ..plan import BitPlan
    from ..solvers import Problem
    from ..calibration import data_hash
    from ..solvers.optuna_search import OptunaSolver, make_storage, redact
    if args.out:
        checks.output_file(args.out)
    check_model_args(args)
    if args.storage.startswith("postgresql"):
        checks.require("psycopg", "search", "a PostgreSQL study storage")
    make_storage(args.storage)                    # an unreachable or malformed storage fails before any work
    prepared = prepare_model(args)
    table = measure(prepared, args.probe, settings=probe_settings(args), cache=not args.no_cache)
    budget = args.budget if args.budget is not None else 16.0
    problem = Problem(table, budget, count_overhead=not args.nominal, fuse=args.fuse)
    solver = OptunaSolver(n_trials=args.n_trials, study_name=args.study, storage=args.storage, sampler=args.sampler,
                          seed=args.seed, windows=args.windows, heartbeat=args.heartbeat, grace=args.grace,
                          timeout=args.timeout, multi_objective=args.budget is None, trial_delay=args.trial_delay,
                          space=args.space, spread=args.spread,
                          settings={"model": prepared.info["hash"], "probe": args.probe,
                                    "probe_settings": table.meta.get("settings"),
                                    "calibration": {"file": args.calib, "windows": list(prepared.tokens.shape),
                                                    "data": data_hash(prepared.tokens)}})
    solver.fitness = with_fitness(prepared, "optuna", {}, max_windows=args.windows)["fitness"]
    study = solver.run(problem)
    import optuna
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    print(f"study {args.study!r} on {redact(solver.storage)}: {len(complete)} complete trials")
    if args.budget is None:
        print(f"{'true bpw':>9}  {'KL':>9}  trial")
        for t in sorted(study.best_trials, key=lambda t: t.values[0]):
            print(f"{t.values[0]:>9.4f}  {t.values[1]:>9.5f}  {t.number}")
        return
    best = study.best_trial
    plan = BitPlan.from_json(json.loads(best.user_attrs["plan"]))
    if plan.true_bpw > budget + 1e-9 and not args.nominal:
        raise BitallocError(f"the study's best plan takes {plan.true_bpw:.4f} true bits per weight, over the budget "
                            f"{budget}: its trials were made under other settings; use a new --study")
    print(f"best trial {best.number}: KL {best.value:.5f} · true {plan.true_bpw:.4f} bits/weight")
    if args.out:
        plan.save(args.out)
        print(f"plan written to {args.out}")


def cmd_dashboard(args) -> None:
    from ..solvers.optuna_search import make_storage, redact
    checks.require("optuna_dashboard", "search", "bitalloc dashboard")
    if not 1 <= args.port <= 65535:
        raise BitallocError(f"--port {args.port} is not a TCP port: give 1–65535 (e.g. 8080)")
    if args.storage.startswith("postgresql"):
        checks.require("psycopg", "search", "a PostgreSQL study storage")
    storage = make_storage(args.storage)
    from optuna_dashboard import run_server
    print(f"optuna-dashboard for {redact(args.storage)} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    run_server(storage, host=args.host, port=args.port)

