"""GGUF files for llama.cpp (issue #22): llama.cpp's Q3_K_M and Q4_K_M mixes (its rules, alloc/reporting/
baselines.py) against bitalloc's plan over ggml types (``--options ggml``) at the same true bits, each written
by ``save_gguf`` (our K-quant quantizers: ``--quantizer rtn`` is the search weighted by the calibration's
input energy, ``gptq`` GPTQ on the K-quant grid) and scored by reading the FILE back through transformers'
GGUF loader: perplexity on held-out windows, and the fake-quantized model's perplexity beside it (they should
agree).

    python examples/bench_gguf.py --model gemma-3-270m-q4_k_m.gguf
    python examples/bench_gguf.py --model gemma-3-270m-q4_k_m.gguf --quantizer gptq --probe kfac

Gemma-3-270M's fp reference is the dequantized Q4_K_M GGUF (loaded in bf16).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections import Counter
from pathlib import Path

from bitalloc import api, save_gguf
from bitalloc.calibration import read_text, windows
from bitalloc.cli.formats import read_gguf
from bitalloc.evaluate import perplexity
from bitalloc.ggml.checkpoint import fake_quantize
from bitalloc.reporting.baselines import llama_cpp_plan
from bitalloc.sensitivity.table import SensitivityTable


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", default="../shared/data/calib.txt")
    ap.add_argument("--eval", default="../shared/data/eval.txt")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--probe", default="fisher")
    ap.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"],
                    help="how every file (the mixes' too) is rounded; kfac then measures that quantizer's ΔW")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--presets", default="Q3_K_M,Q4_K_M")
    ap.add_argument("--only-ours", action="store_true", help="skip scoring the llama.cpp mixes themselves")
    ap.add_argument("--work", default=None, help="folder for the .gguf files (default: a temporary one)")
    ap.add_argument("--without", default="Q2_K", help="also solve without these ggml options (comma list; '' skips)")
    args = ap.parse_args()
    t0 = time.time()
    p = api.prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, seq_len=args.seq_len,
                    dtype=args.dtype, options="ggml")
    table = api.measure(p, args.probe, settings=api.quantizer_settings(args.probe, args.quantizer, {}))
    tokens = windows(p.tokenizer, read_text(args.eval), seq_len=args.seq_len, n_windows=args.eval_windows,
                     source="eval")
    fp = perplexity(p.model, tokens, desc="ppl fp", progress=False)
    print(f"{p.info['id']}: {len(p.units)} units, fp ppl {fp:.4f}, {args.probe} table for {args.quantizer} "
          f"{time.time() - t0:.0f} s", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_gguf-"))
    dtype = next(p.model.parameters()).dtype

    def score(label, plan):
        t = time.time()
        out = work / f"{label.replace(' ', '_')}.gguf"
        out.unlink(missing_ok=True)
        r = save_gguf(p.model, plan, out, tokenizer=p.tokenizer, calibration=p.tokens, progress=False,
                      quantizer=args.quantizer, keep_weights=True)
        fake = copy.deepcopy(p.model)
        fake_quantize(fake, r["units"], r["importance"], r["weights"])
        ppl_fake = perplexity(fake, tokens, desc="ppl fake", progress=False)
        del fake
        ppl_file = perplexity(read_gguf(out, dtype), tokens, desc="ppl file", progress=False)
        mix = dict(sorted(Counter(r["units"].values()).items()))
        print(f"{label:22s} bpw {r['bpw']:.4f} file {r['bytes']:>12,} B  ppl(file) {ppl_file:9.3f}  "
              f"ppl(fake) {ppl_fake:9.3f}  types {mix} ({time.time() - t:.0f} s)", flush=True)

    for preset in args.presets.split(","):
        mix = llama_cpp_plan(preset, table, getattr(p.model, "config", None))
        if not args.only_ours:
            score(f"llama.cpp {preset}", mix)
        score(f"bitalloc @{preset}", api.solve(table, mix.true_bpw + 1e-9, "ilp"))
        if args.without:
            drop = set(args.without.upper().split(","))
            keep = [j for j, o in enumerate(table.options) if o.ggml not in drop]
            sub = SensitivityTable(table.units, [table.options[j] for j in keep], table.cost[:, keep], dict(table.meta))
            score(f"bitalloc @{preset} -{'-'.join(sorted(drop))}", api.solve(sub, mix.true_bpw + 1e-9, "ilp"))
    print(f"total {time.time() - t0:.0f} s; files in {work}")


if __name__ == "__main__":
    main()
