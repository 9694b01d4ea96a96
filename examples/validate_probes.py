"""Probe validation (BENCHMARK.md): how well each probe ranks layers against the measured ground truth.

For each probe: wall time, time to reload the same table from the cache, and Spearman rank correlation
ACROSS LAYERS between its cost and measured_kl at fixed bits (2, 3, 4 and the mean); then the perplexity of
each probe's ILP plan at 2.5 and 3.25 true bits (RTN).

    python examples/validate_probes.py --model ../shared/models/refllama-s --calib ../shared/data/calib.txt \
        --eval ../shared/data/eval.txt
"""
from __future__ import annotations

import argparse
import time

import torch

from bitalloc import api
from bitalloc.calibration import read_text, windows
from bitalloc.evaluate import Evaluator
from bitalloc.quantize_model import quantize_model, set_unit_weights, unit_weights


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--probes", default="output_error,block_similarity,fisher,kfac,hessian_trace")
    ap.add_argument("--kl-windows", type=int, default=8)
    ap.add_argument("--budgets", default="2.5,3.25")
    args = ap.parse_args()

    prepared = api.prepare(args.model, calib_file=args.calib, n_windows=128, dtype="fp32")   # BENCHMARK.md protocol
    t0 = time.time()
    truth = api.measure(prepared, "measured_kl", settings={"n_windows": args.kl_windows})
    print(f"measured_kl ({args.kl_windows} windows): {time.time() - t0:.1f} s")
    tokens = windows(prepared.tokenizer, read_text(args.eval), seq_len=512, n_windows=64, source="eval")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    bits = [o.bits for o in prepared.options]
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for name in ["measured_kl", *args.probes.split(",")]:
        t0 = time.time()
        table = truth if name == "measured_kl" else api.measure(prepared, name)
        seconds = time.time() - t0
        t0 = time.time()
        api.measure(prepared, name, settings={"n_windows": args.kl_windows} if name == "measured_kl" else None)
        cached = time.time() - t0
        rho = {b: spearman(table.cost[:, bits.index(b)], truth.cost[:, bits.index(b)]) for b in (2, 3, 4)}
        ppl = {}
        for budget in budgets:
            plan = api.solve(table, budget, "ilp")
            quantize_model(prepared.model, prepared.units, plan, progress=False)
            weights = unit_weights(prepared.model, prepared.units)
            set_unit_weights(prepared.model, prepared.units, ev.fp_weights)
            ppl[budget] = ev.score(weights).ppl
        rows.append((name, seconds, cached, rho, ppl))
        print(f"{name}: {seconds:.1f} s, cache {cached:.2f} s, rho {rho}, ppl {ppl}", flush=True)

    print(f"\nfp ppl {ev.fp.ppl:.4f}; Spearman vs measured_kl across {len(prepared.units)} layers; "
          f"ILP plans, RTN g128")
    head = " ".join(f"{'ppl@' + str(b):>9}" for b in budgets)
    print(f"{'probe':<17} {'time s':>7} {'cache s':>7} {'rho2':>6} {'rho3':>6} {'rho4':>6} {'mean':>6} {head}")
    for name, seconds, cached, rho, ppl in rows:
        mean = sum(rho.values()) / 3
        cells = " ".join(f"{ppl[b]:>9.4f}" for b in budgets)
        print(f"{name:<17} {seconds:>7.1f} {cached:>7.2f} {rho[2]:>6.3f} {rho[3]:>6.3f} {rho[4]:>6.3f} {mean:>6.3f} {cells}")


if __name__ == "__main__":
    main()
