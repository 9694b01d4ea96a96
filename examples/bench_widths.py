"""Does a plan pay for its lowest widths? (issue #19). On one model, with GPTQ: uniform W3/W4, llama.cpp's
Q3_K_M mix, and the probe's ILP layer plan and closed-form row plan at 3.25 true bpw and at the mix's own
true bpw, each solved over all options and over the options of at least ⌊budget⌋ bits (what
``finish.check_widths`` compares on calibration windows). Perplexity and KL to fp on held-out windows.

    python examples/bench_widths.py --model gemma-3-270m-q4_k_m.gguf --probe kfac

Gemma-3-270M's fp reference is the dequantized Q4_K_M GGUF (loaded in bf16).
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

from bitalloc import QuantSpec, api
from bitalloc.calibration import read_text, windows
from bitalloc.evaluate import Evaluator
from bitalloc.finish import without_low_widths
from bitalloc.plan import BitPlan
from bitalloc.reporting.baselines import baseline_plans


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", default="../shared/data/calib.txt")
    ap.add_argument("--eval", default="../shared/data/eval.txt")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--probe", default="kfac")
    ap.add_argument("--quantizer", default="gptq")
    ap.add_argument("--n-windows", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args()
    t0 = time.time()
    p = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, dtype=args.dtype)
    table = api.measure(p, args.probe, settings=api.quantizer_settings(args.probe, args.quantizer, {}))
    tokens = windows(p.tokenizer, read_text(args.eval), seq_len=512, n_windows=args.eval_windows, source="eval")
    ev = Evaluator(p.model, p.kind, p.units, tokens, progress=False)
    print(f"{p.info['id']}: {len(p.units)} units, fp ppl {ev.fp.ppl:.4f} ({time.time() - t0:.0f} s)", flush=True)

    def score(label, plan):
        t = time.time()
        s = ev.score_plan(plan, args.quantizer, p.tokens)
        widths = dict(sorted(Counter(spec.bits for spec in plan.layers.values()).items()))
        print(f"{args.quantizer} {label:26s} bpw {plan.true_bpw:.4f} ppl {s.ppl:9.3f} KL {s.kl:.4f} "
              f"layer widths {widths} ({time.time() - t:.0f} s)", flush=True)

    for bits in (3, 4):
        score(f"uniform W{bits}", BitPlan.from_choice(p.units, [QuantSpec(bits)] * len(p.units), solver="uniform"))
    mix = dict(baseline_plans("llama.cpp", table, getattr(p.model, "config", None)))["Q3_K_M"]
    score("llama.cpp Q3_K_M", mix)
    for budget in (3.25, round(mix.true_bpw, 6)):
        for kind, plan in (("layer", api.solve(table, budget)),
                           ("row", api.solve(table, budget, "closed_form", granularity="row"))):
            score(f"{kind} {budget}", plan)
            other = without_low_widths(table, plan)
            if other is not None:
                score(f"{kind} {budget} ≥{int(budget)} bits", other)


if __name__ == "__main__":
    main()
