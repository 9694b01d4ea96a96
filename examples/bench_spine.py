"""Spine acceptance benchmark (BENCHMARK.md, "Quality targets"): excess ratio of allocated plans.

    excess ratio = (ppl_plan − ppl_fp) / (ppl_ref − ppl_fp)

At the budget of uniform 3-bit (3.25 true bits) ppl_ref is the uniform W3 g128 plan; at 2.5 bits it is the
linear interpolation, in true bpw, between uniform W2 and W3 g128. Target ≤ 0.5 for RTN and for GPTQ.

    python examples/bench_spine.py --model ../shared/models/refllama-s --calib ../shared/data/calib.txt \
        --eval ../shared/data/eval.txt [--granularities layer,row]
"""
from __future__ import annotations

import argparse
import time

from bitalloc import QuantSpec, api
from bitalloc.calibration import read_text, windows
from bitalloc.evaluate import Evaluator
from bitalloc.plan import BitPlan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--probe", default="fisher")
    ap.add_argument("--solver", default="ilp")
    ap.add_argument("--options", default=None)
    ap.add_argument("--budgets", default="3.25,2.5")
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--n-windows", type=int, default=128)
    ap.add_argument("--granularities", default="layer,row", help="layer (one width per layer), row (per output row)")
    ap.add_argument("--row-solver", default="closed_form", help="solver at row granularity: closed_form, greedy, ilp")
    args = ap.parse_args()

    t0 = time.time()
    # fp32 on CPU: the perplexity protocol of BENCHMARK.md (the CLI loads a checkpoint in its own dtype)
    prepared = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, options=args.options,
                           dtype="fp32")
    table = api.measure(prepared, args.probe)
    print(f"probe {args.probe}: {time.time() - t0:.1f} s (incl. load; cached: {'cached' in table.meta})")
    tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=512, n_windows=64, source="eval")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    fp = ev.fp.ppl
    print(f"fp ppl {fp:.4f}")

    def ppl(plan: BitPlan, quantizer: str) -> float:
        return ev.score_plan(plan, quantizer, prepared.tokens).ppl

    def uniform(bits: int) -> BitPlan:
        return BitPlan.from_choice(prepared.units, [QuantSpec(bits)] * len(prepared.units), solver="uniform")

    print(f"{'quantizer':<9} {'gran':>5} {'budget':>6} {'plan bpw':>8} {'plan ppl':>9} {'ref':>22} {'ref ppl':>8} "
          f"{'ratio':>6} target")
    for quantizer in args.quantizers.split(","):
        u2, u3 = uniform(2), uniform(3)
        p2, p3 = ppl(u2, quantizer), ppl(u3, quantizer)
        for budget, granularity in ((float(b), g) for b in args.budgets.split(",")
                                    for g in args.granularities.split(",")):
            solver = args.solver if granularity == "layer" else args.row_solver
            plan = api.solve(table, budget, solver, granularity=granularity)
            pp = ppl(plan, quantizer)
            if budget >= u3.true_bpw and budget < 4:
                ref, label = p3, f"uniform W3 ({u3.true_bpw:.3f})"
            else:
                w = (budget - u2.true_bpw) / (u3.true_bpw - u2.true_bpw)
                ref, label = p2 + w * (p3 - p2), f"interp W2..W3 @{budget}"
            ratio = (pp - fp) / (ref - fp)
            print(f"{quantizer:<9} {granularity:>5} {budget:>6} {plan.true_bpw:>8.4f} {pp:>9.4f} {label:>22} {ref:>8.4f} {ratio:>6.3f} "
                  f"{'met' if ratio <= 0.5 else 'MISSED'} (≤ 0.5)")
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
