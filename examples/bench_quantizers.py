"""Each quantizer refinement alone and together, on uniform plans (issue #19: "measure each addition alone, keep
what helps on BOTH models"): RTN plain and with the clipping search; GPTQ plain, + act-order, + clipping,
+ true-sequential, all three. Perplexity and KL to fp on held-out windows of eval.txt.

    python examples/bench_quantizers.py --model ../shared/models/refllama-s --dtype fp32 --bits 3,2
    python examples/bench_quantizers.py --model gemma-3-270m-q4_k_m.gguf --bits 3

Gemma-3-270M's fp reference is the dequantized Q4_K_M GGUF (loaded in bf16).
"""
from __future__ import annotations

import argparse
import time

from bitalloc import QuantSpec, api
from bitalloc.calibration import read_text, windows
from bitalloc.evaluate import Evaluator
from bitalloc.plan import BitPlan
from bitalloc.quantize import Quantizer

VARIANTS = {
    "rtn": Quantizer("rtn"), "rtn+clip": Quantizer("rtn", clip=True),
    "gptq": Quantizer("gptq"), "gptq+act": Quantizer("gptq", act_order=True), "gptq+clip": Quantizer("gptq", clip=True),
    "gptq+seq": Quantizer("gptq", sequential=True),
    "gptq+act+clip": Quantizer("gptq", clip=True, act_order=True),
    "gptq+all": Quantizer("gptq", clip=True, act_order=True, sequential=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default="../shared/data/calib.txt")
    ap.add_argument("--eval", default="../shared/data/eval.txt")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--bits", default="3")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--n-windows", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--eval-windows", type=int, default=32)
    args = ap.parse_args()
    prepared = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, dtype=args.dtype)
    tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=512, n_windows=args.eval_windows, source="eval")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    print(f"{prepared.info['id']}: fp ppl {ev.fp.ppl:.4f} ({len(tokens)} windows of 512 tokens)")
    for bits in (int(b) for b in args.bits.split(",")):
        plan = BitPlan.from_choice(prepared.units, [QuantSpec(bits)] * len(prepared.units), solver="uniform")
        for name in args.variants.split(","):
            t0 = time.time()
            s = ev.score_plan(plan, VARIANTS[name], prepared.tokens)
            print(f"W{bits}g128 {name:14s} ppl {s.ppl:10.4f}  KL {s.kl:.5f}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
