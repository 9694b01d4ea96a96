"""Honest tables on a model trained by others (issue #19): per budget, bitalloc's plans beside uniform plans and
llama.cpp's Q2_K / Q3_K_S / Q3_K_M / Q4_K_M tensor-type mixes (on g128 formats; bitalloc also at each mix's own
true bpw), with RTN and with GPTQ; perplexity and KL to fp on held-out text; the wall time of every stage.

Plan kinds, as a user gets them:
    layer     the solver's plan from the table (``bitalloc solve``)
    row       the solver's per-row plan from the table (``bitalloc solve --granularity row``)
    checked   ``bitalloc allocate --granularity row --check``: the row plan after the measured checks of alloc/finish.py
              (falls back to the layer plan when that scores better; drops widths below ⌊budget⌋ when that does);
              at the budgets of --finish-at
    refined   ``bitalloc allocate --granularity row --refine SECONDS`` (at the budgets of --refine-at)
Writes STEM.md and STEM.csv after every scored plan (a killed run keeps what it scored).

    python examples/bench_real.py --model gemma-3-270m-q4_k_m.gguf --out examples/results/real_gemma3_270m
    python examples/bench_real.py --model ../shared/models/refllama-s --out examples/results/real_refllama

Gemma-3-270M's fp reference is the dequantized Q4_K_M GGUF (loaded in bf16).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from bitalloc import QuantSpec, api
from bitalloc.calibration import read_text, windows
from bitalloc.evaluate import Evaluator
from bitalloc.finish import fitness_for
from bitalloc.plan import BitPlan
from bitalloc.reporting.baselines import baseline_plans

KINDS = ("layer", "row", "checked", "refined")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default="../shared/data/calib.txt")
    ap.add_argument("--eval", default="../shared/data/eval.txt")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--probe", default="kfac")
    ap.add_argument("--budgets", default="2.5,3.0,3.25,3.5,4.0")
    ap.add_argument("--quantizers", default="gptq,rtn")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"plan kinds scored, of {', '.join(KINDS)}")
    ap.add_argument("--refine", type=float, default=600.0, help="seconds of refine per refined plan")
    ap.add_argument("--finish-at", default="3.25,=Q3_K_M",
                    help="budget labels where the checked and refined kinds are scored (e.g. 3.25,=Q3_K_M), or all")
    ap.add_argument("--refine-at", default="3.25", help="of those, the labels also refined, or all")
    ap.add_argument("--n-windows", type=int, default=32, help="calibration windows")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--mixes", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_M", help="llama.cpp mixes scored ('' for none)")
    ap.add_argument("--uniform", default="2,3,4,8", help="uniform widths scored")
    ap.add_argument("--out", required=True, help="path stem: writes STEM.md and STEM.csv")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]

    t0 = time.time()
    prepared = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, dtype=args.dtype)
    tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=512, n_windows=args.eval_windows, source="eval")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    name = prepared.info["id"]
    rows = [dict(model=name, quantizer="-", kind="fp", label="fp", bpw=16.0, ppl=ev.fp.ppl, kl=0.0,
                 plan_s=round(time.time() - t0, 1), eval_s=0.0)]
    print(f"{name}: fp ppl {ev.fp.ppl:.4f} on {len(tokens)} × 512 held-out tokens ({time.time() - t0:.0f} s)", flush=True)

    def scored(kind, label, plan, quantizer, plan_s, **extra):
        t = time.time()
        s = ev.score_plan(plan, quantizer, prepared.tokens)
        row = dict(model=name, quantizer=quantizer, kind=kind, label=label, bpw=plan.true_bpw, ppl=s.ppl, kl=s.kl,
                   plan_s=round(plan_s, 1), eval_s=round(time.time() - t, 1), **extra)
        rows.append(row)
        write(rows, Path(args.out), args, time.time() - t0)
        print(f"{quantizer:5s} {kind:10s} {label:9s} bpw {plan.true_bpw:.4f} ppl {s.ppl:10.4f} KL {s.kl:.5f} "
              f"(plan {plan_s:.0f} s, eval {row['eval_s']:.0f} s) {extra or ''}", flush=True)

    for quantizer in args.quantizers.split(","):
        t = time.time()
        table = api.measure(prepared, args.probe, settings=api.quantizer_settings(args.probe, quantizer, {}))
        rows.append(dict(model=name, quantizer=quantizer, kind="probe", label=args.probe, bpw=0, ppl=0, kl=0,
                         plan_s=round(time.time() - t, 1), eval_s=0))
        print(f"{quantizer}: {args.probe} table {time.time() - t:.0f} s", flush=True)
        for bits in [int(b) for b in args.uniform.split(",") if b]:
            plan = BitPlan.from_choice(prepared.units, [QuantSpec(bits)] * len(prepared.units), solver="uniform")
            scored("uniform", f"W{bits}g128", plan, quantizer, 0.0)
        targets = [(f"{float(b):g}", float(b)) for b in args.budgets.split(",") if b]
        wanted = [m for m in args.mixes.split(",") if m]
        for label, mix in baseline_plans("llama.cpp", table, getattr(prepared.model, "config", None)):
            if label in wanted:
                scored("llama.cpp", label, mix, quantizer, 0.0)
                targets.append((f"={label}", round(mix.true_bpw, 6)))
        fitness = fitness_for(prepared, quantizer) if {"checked", "refined"} & set(kinds) else None
        for label, budget in targets:
            plans = {}
            for kind in ("layer", "row"):
                t = time.time()
                plans[kind] = api.solve(table, budget, "ilp" if kind == "layer" else "closed_form", granularity=kind)
                if kind in kinds:
                    scored(kind, label, plans[kind], quantizer, time.time() - t)
            finishing = [k for k in ("checked", "refined") if k in kinds and _at(label, args.finish_at)]
            if "refined" in finishing and not _at(label, args.refine_at):
                finishing.remove("refined")
            for kind in finishing:
                t = time.time()
                seed = api.solve(table, budget, "closed_form", granularity="row")
                plan = api.finish(prepared, table, seed, quantizer=quantizer, fitness=fitness, progress=False,
                                  check=True, refine=args.refine if kind == "refined" else None)
                scored(kind, label, plan, quantizer, time.time() - t, **_notes(plan))
        if fitness is not None:
            fitness.restore()
    write(rows, Path(args.out), args, time.time() - t0)
    print(f"-> {args.out}.md, {args.out}.csv")


def _at(label: str, labels: str) -> bool:
    return labels == "all" or label in labels.split(",")


def _notes(plan: BitPlan) -> dict:
    """What the finishing stage did to a plan, for the table's notes."""
    out = {"granularity": "row" if plan.row_bits else "layer"}
    if "fallback" in plan.extra:
        out["fell_back"] = "layer"
    if "chosen" in plan.extra.get("width_check", {}):
        out["widths"] = plan.extra["width_check"]["chosen"]
    r = plan.extra.get("refine")
    if r:
        out.update(seed_kl=round(r["seed_kl"], 5), fit_kl=round(r["kl"], 5), generations=r["generations"],
                   refine_s=r["seconds"])
    return out


def write(rows: list[dict], stem: Path, args, seconds: float) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fp = rows[0]["ppl"]
    lines = [f"# {rows[0]['model']}: plans on {args.eval_windows} × 512 held-out tokens of {Path(args.eval).name}",
             "", f"`python examples/bench_real.py {' '.join(_argv())}` ({seconds / 60:.0f} min on this machine); "
             f"fp perplexity {fp:.4f}; probe {args.probe}, calibration {args.n_windows} × 512 tokens of "
             f"{Path(args.calib).name}; checked at {args.finish_at}; refine {args.refine:.0f} s at {args.refine_at}.", "",
             "| quantizer | kind | label | true bpw | ppl | KL | plan s | eval s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    note_keys = ("granularity", "fell_back", "widths", "seed_kl", "fit_kl", "generations", "refine_s")
    for r in rows[1:]:
        if r["kind"] == "probe":
            lines.append(f"| {r['quantizer']} | probe | {r['label']} | | | | {r['plan_s']} | | table |")
            continue
        notes = ", ".join(f"{k} {r[k]}" for k in note_keys if r.get(k) not in (None, ""))
        lines.append(f"| {r['quantizer']} | {r['kind']} | {r['label']} | {r['bpw']:.4f} | {r['ppl']:.4f} | "
                     f"{r['kl']:.5f} | {r['plan_s']} | {r['eval_s']} | {notes} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _argv() -> list[str]:
    import sys
    return sys.argv[1:]


if __name__ == "__main__":
    main()
