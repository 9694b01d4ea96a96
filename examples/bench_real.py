"""Honest tables on a model trained by others (issue #19): per budget, bitalloc's layer, row and refined plans
beside uniform plans and llama.cpp's Q2_K / Q3_K_S / Q3_K_M / Q4_K_M tensor-type mixes (on g128 formats, and
bitalloc at each mix's own true bpw), with RTN and with GPTQ; perplexity and KL to fp on held-out text; the
wall time of every stage. Writes a Markdown table and a CSV.

    python examples/bench_real.py --model gemma-3-270m-q4_k_m.gguf --out examples/results/real_gemma3_270m
    python examples/bench_real.py --model ../shared/models/refllama-s --dtype fp32 --out examples/results/real_refllama

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
from bitalloc.finish import check_rows, fitness_for, refine_plan
from bitalloc.plan import BitPlan
from bitalloc.reporting.baselines import baseline_plans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default="../shared/data/calib.txt")
    ap.add_argument("--eval", default="../shared/data/eval.txt")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--probe", default=api.DEFAULT_PROBE)
    ap.add_argument("--probe-settings", default="", help="k=v,… passed to the probe")
    ap.add_argument("--budgets", default="2.5,3.0,3.25,3.5,4.0")
    ap.add_argument("--quantizers", default="gptq,rtn")
    ap.add_argument("--refine", type=float, default=300.0, help="seconds of refine per plan (0: none)")
    ap.add_argument("--n-windows", type=int, default=32, help="calibration windows")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--mixes", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_M", help="llama.cpp mixes scored ('' for none)")
    ap.add_argument("--uniform", default="2,3,4,8", help="uniform widths scored")
    ap.add_argument("--refine-at", default="all", help="budgets (labels) refined: all, or e.g. 3.25,=Q3_K_M")
    ap.add_argument("--rtn-kinds", default="all", help="with RTN, only these plan kinds (e.g. uniform,llama.cpp,layer)")
    ap.add_argument("--out", required=True, help="path stem: writes STEM.md and STEM.csv")
    args = ap.parse_args()
    settings = {k: (int(v) if v.isdigit() else v) for k, v in (kv.split("=") for kv in args.probe_settings.split(",") if kv)}

    t0 = time.time()
    prepared = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, dtype=args.dtype)
    tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=512, n_windows=args.eval_windows, source="eval")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    name = prepared.info["id"]
    rows = [dict(model=name, quantizer="-", kind="fp", label="fp", bpw=16.0, ppl=ev.fp.ppl, kl=0.0,
                 plan_s=round(time.time() - t0, 1), eval_s=0.0)]
    print(f"{name}: fp ppl {ev.fp.ppl:.4f} on {len(tokens)} × 512 held-out tokens ({time.time() - t0:.0f} s)", flush=True)

    def wants(kind, quantizer):
        return quantizer != "rtn" or args.rtn_kinds == "all" or kind in args.rtn_kinds.split(",")

    def scored(kind, label, plan, quantizer, plan_s, **extra):
        if not wants(kind, quantizer):
            return
        t = time.time()
        s = ev.score_plan(plan, quantizer, prepared.tokens)
        row = dict(model=name, quantizer=quantizer, kind=kind, label=label, bpw=plan.true_bpw, ppl=s.ppl, kl=s.kl,
                   plan_s=round(plan_s, 1), eval_s=round(time.time() - t, 1), **extra)
        rows.append(row)
        write(rows, Path(args.out), args, time.time() - t0)           # every row as it is scored: a kill loses none
        print(f"{quantizer:5s} {kind:10s} {label:18s} bpw {plan.true_bpw:.4f} ppl {s.ppl:10.4f} KL {s.kl:.5f} "
              f"(plan {plan_s:.0f} s, eval {row['eval_s']:.0f} s) {extra or ''}", flush=True)

    budgets = [float(b) for b in args.budgets.split(",")]
    for quantizer in args.quantizers.split(","):
        t = time.time()
        table = api.measure(prepared, args.probe, settings=api.quantizer_settings(args.probe, quantizer, settings))
        probe_s = time.time() - t
        print(f"{quantizer}: {args.probe} table {probe_s:.0f} s", flush=True)
        rows.append(dict(model=name, quantizer=quantizer, kind="probe", label=args.probe, bpw=0, ppl=0, kl=0,
                         plan_s=round(probe_s, 1), eval_s=0))
        fitness = fitness_for(prepared, quantizer) if args.refine or wants("row", quantizer) else None
        for bits in [int(b) for b in args.uniform.split(",") if b]:
            scored("uniform", f"W{bits}g128", BitPlan.from_choice(prepared.units, [QuantSpec(bits)] * len(prepared.units),
                                                                  solver="uniform"), quantizer, 0.0)
        targets = [(f"{b}", b) for b in budgets]
        wanted = [m for m in args.mixes.split(",") if m]
        for label, mix in baseline_plans("llama.cpp", table, getattr(prepared.model, "config", None)):
            if label in wanted:
                scored("llama.cpp", label, mix, quantizer, 0.0)
                targets.append((f"={label}", round(mix.true_bpw, 6)))
        for label, budget in targets:
            t = time.time()
            layer = api.solve(table, budget)
            scored("layer", label, layer, quantizer, time.time() - t)
            if table.row_cost is not None and wants("row", quantizer):
                t = time.time()
                row = api.solve(table, budget, "closed_form", granularity="row")
                if fitness is not None:
                    row = check_rows(table, row, fitness)
                scored("row", label, row, quantizer, time.time() - t, fallback="fallback" in row.extra)
            if args.refine and wants("refined", quantizer) and (args.refine_at == "all" or label in args.refine_at.split(",")):
                seed = row if table.row_cost is not None and wants("row", quantizer) else layer
                t = time.time()
                refined = refine_plan(table, seed, fitness, args.refine, progress=False)
                fitness.restore()
                r = refined.extra["refine"]
                scored("refined", label, refined, quantizer, time.time() - t, seed_kl=round(r["seed_kl"], 5),
                       fit_kl=round(r["kl"], 5), generations=r["generations"])
        if fitness is not None:
            fitness.restore()
    write(rows, Path(args.out), args, time.time() - t0)
    print(f"-> {args.out}.md, {args.out}.csv")


def write(rows: list[dict], stem: Path, args, seconds: float) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[-1]).index(k) if k in rows[-1] else 99)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    fp = rows[0]["ppl"]
    lines = [f"# {rows[0]['model']}: plans on {args.eval_windows} × 512 held-out tokens of {Path(args.eval).name}",
             "", f"`python examples/bench_real.py {' '.join(_argv())}` ({seconds / 60:.0f} min on this machine); "
             f"fp perplexity {fp:.4f}; probe {args.probe}, calibration {args.n_windows} × 512 tokens of "
             f"{Path(args.calib).name}; refine {args.refine:.0f} s per plan.", "",
             "| quantizer | kind | label | true bpw | ppl | KL | plan s | eval s | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        if r["kind"] == "probe":
            lines.append(f"| {r['quantizer']} | probe | {r['label']} | | | | {r['plan_s']} | | table |")
            continue
        notes = ", ".join(f"{k} {r[k]}" for k in ("seed_kl", "fit_kl", "generations", "fallback") if r.get(k) not in (None, ""))
        lines.append(f"| {r['quantizer']} | {r['kind']} | {r['label']} | {r['bpw']:.4f} | {r['ppl']:.4f} | "
                     f"{r['kl']:.5f} | {r['plan_s']} | {r['eval_s']} | {notes} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")



def _argv() -> list[str]:
    import sys
    return sys.argv[1:]


if __name__ == "__main__":
    main()
