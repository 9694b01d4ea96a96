"""Per-row vs per-layer plans at equal true bits (issue #12), on any model: causal LMs by perplexity, encoders
by embedding cosine to the fp model.

    excess ratio = (metric_plan − metric_fp) / (metric_ref − metric_fp)      (for cosine: 1 − cosine)

ref is the BENCHMARK.md reference: uniform W3 g128 at 3.25 bits, the W2↔W3 interpolation at 2.5 bits.

    python examples/bench_rows.py --model ../shared/models/refllama-s --calib ../shared/data/calib.txt \\
        --eval ../shared/data/eval.txt --probe fisher
    python examples/bench_rows.py --model <all-MiniLM-L6-v2 folder> --eval ../shared/data/eval.txt \\
        --probe output_error --seq-len 128 --eval-windows 64
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
    ap.add_argument("--budgets", default="3.25,2.5")
    ap.add_argument("--quantizers", default="rtn,gptq")
    ap.add_argument("--n-windows", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=64)
    args = ap.parse_args()

    t0 = time.time()
    prepared = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, seq_len=args.seq_len,
                           dtype="fp32")
    table = api.measure(prepared, args.probe)
    print(f"{prepared.info['id']}: probe {args.probe} {time.time() - t0:.1f} s; {len(table.units)} layers, "
          f"{table.row_cost.shape[0]:,} rows")
    tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=args.seq_len, n_windows=args.eval_windows,
                     source="eval")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    causal = prepared.kind == "causal_lm"

    def err(score) -> float:              # distance from fp: perplexity, or 1 − cosine for encoders
        return score.ppl if causal else 1.0 - score.cosine
    fp = err(ev.fp)

    def measure(plan: BitPlan, quantizer: str) -> float:
        return err(ev.score_plan(plan, quantizer, prepared.tokens))

    def uniform(bits: int) -> BitPlan:
        return BitPlan.from_choice(prepared.units, [QuantSpec(bits)] * len(prepared.units), solver="uniform")

    metric = "ppl" if causal else "1-cos"
    print(f"fp {metric} {fp:.5f}; {len(tokens)} eval windows of {tokens.shape[1]} tokens")
    print(f"{'quantizer':<9} {'budget':>6} {'granularity':>11} {'true bpw':>8} {metric:>9} {'ref':>9} {'ratio':>6}  "
          f"row/layer")
    for quantizer in args.quantizers.split(","):
        u2, u3 = uniform(2), uniform(3)
        e2, e3 = measure(u2, quantizer), measure(u3, quantizer)
        for budget in (float(b) for b in args.budgets.split(",")):
            if u3.true_bpw <= budget < 4:
                ref = e3
            else:
                w = (budget - u2.true_bpw) / (u3.true_bpw - u2.true_bpw)
                ref = e2 + w * (e3 - e2)
            ratios = {}
            for granularity, solver in (("layer", "ilp"), ("row", "closed_form")):
                plan = api.solve(table, budget, solver, granularity=granularity)
                e = measure(plan, quantizer)
                ratios[granularity] = (e - fp) / (ref - fp)
                print(f"{quantizer:<9} {budget:>6} {granularity:>11} {plan.true_bpw:>8.4f} {e:>9.5f} {ref:>9.5f} "
                      f"{ratios[granularity]:>6.3f}" + (f"  {ratios['row'] / ratios['layer']:.3f}"
                                                        if granularity == "row" else ""))
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
