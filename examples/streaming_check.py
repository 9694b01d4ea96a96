"""Block streaming against the whole-model path on refllama-s, the figures behind the streaming tests:
probe tables (largest relative difference), GPTQ codes (identical or not), perplexity and KL of a plan
(relative difference), and the search's KL fitness.

    python examples/streaming_check.py [--windows 8 --seq-len 256]
"""
from __future__ import annotations

import argparse
import copy
import functools

import torch
from bitalloc import quantize_model as qm
from bitalloc.api import measure, prepare, solve
from bitalloc.evaluate import streamed_scores
from bitalloc.fitness import KLFitness, StreamedKLFitness
from bitalloc.models.stream import BlockStream
from bitalloc.sensitivity import get_probe


def rel(a, b) -> float:
    return float(((a - b).abs() / a.abs().clamp_min(1e-30)).max())


def whole_scores(prepared, tokens, plan, quantizer):
    """Perplexity and KL of ``plan`` with the whole model quantized in place (then put back)."""
    from bitalloc.evaluate import Evaluator
    from bitalloc.quantize_model import set_unit_weights, unit_weights
    evaluator = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    qm.quantize_model(prepared.model, prepared.units, plan, progress=False, quantizer=quantizer,
                      calibration=prepared.tokens)
    weights = unit_weights(prepared.model, prepared.units)
    set_unit_weights(prepared.model, prepared.units, evaluator.fp_weights)
    return evaluator.fp, evaluator.score(weights)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    prepared = prepare(None, n_windows=args.windows, seq_len=args.seq_len)
    print(f"refllama-s, {len(prepared.tokens)} calibration windows × {prepared.tokens.shape[1]} tokens, bf16")
    for probe in ("fisher", "measured_kl", "block_similarity", "output_error"):
        whole = get_probe(probe, stream="off").measure(prepared.workload, prepared.units, prepared.options)
        streamed = get_probe(probe, stream="on").measure(prepared.workload, prepared.units, prepared.options)
        assert streamed.meta.get("streamed") is True and not whole.meta.get("streamed")     # both paths ran
        print(f"  {probe:<17} table: largest relative difference {rel(whole.cost, streamed.cost):.2e}")
    plan = solve(measure(prepared, "fisher", cache=False), 3.25, "ilp")
    staged = copy.deepcopy(prepared.model)
    codes, codes_s = {}, {}
    model = copy.deepcopy(prepared.model)
    qm.quantize_model(model, prepared.units, plan, quantizer="gptq", calibration=prepared.tokens, progress=False,
                      sink=lambda n, q: codes.__setitem__(n, q.codes))
    qm.BlockStream = functools.partial(BlockStream, copy=True)      # stage each block as a copy, as on a GPU
    try:
        qm.quantize_model(staged, prepared.units, plan, quantizer="gptq", calibration=prepared.tokens,
                          progress=False, sink=lambda n, q: codes_s.__setitem__(n, q.codes), compute_device="cpu")
    finally:
        qm.BlockStream = BlockStream
    same = sum(torch.equal(codes[n], codes_s[n]) for n in codes)
    print(f"  GPTQ (3.25-bit plan) codes: {same} of {len(codes)} units identical block by block")
    del model, staged
    tokens = prepared.tokens[:4]
    for quantizer in ("rtn", "gptq"):
        fp_s, plan_s = streamed_scores(prepared.model, prepared.units, tokens, plan, progress=False,
                                       quantizer=quantizer, calibration=prepared.tokens)
        fp_w, plan_w = whole_scores(prepared, tokens, plan, quantizer)
        print(f"  eval {quantizer:<4}: ppl {plan_w.ppl:.6f} whole, {plan_s.ppl:.6f} streamed (relative "
              f"{abs(plan_s.ppl / plan_w.ppl - 1):.1e}; fp {abs(fp_s.ppl / fp_w.ppl - 1):.1e}); KL relative "
              f"{abs(plan_s.kl / plan_w.kl - 1):.1e}")
    whole, streamed = KLFitness(prepared, max_windows=4), StreamedKLFitness(prepared, max_windows=4)
    choice = torch.randint(0, len(prepared.options), (len(prepared.units),), generator=torch.Generator().manual_seed(0))
    a = whole(choice, None)
    whole.restore()
    b = streamed(choice, None)
    print(f"  search fitness (KL, 4 windows): whole {a:.6f}, streamed {b:.6f} (relative {abs(b / a - 1):.1e})")


if __name__ == "__main__":
    main()
