"""Every family of the local model zoo, end to end: unit coverage of the decoder's matrix weights, a real
allocate (fisher + ilp at 3.2 true bits, random calibration ids) with the experts' share of the plan's bits,
and apply -> save -> load against the fake-quantized logits.

    python examples/zoo_report.py

Random weights: the figures check coverage, accounting and exactness, not quality.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import bitalloc
import torch
from bitalloc.models import zoo
from bitalloc.packed import load, save
from bitalloc.quantize_model import quantize_model
from bitalloc.units import EXPERT_KINDS, decoder_matrices, find_units


def report(family: str, experts: str, work: Path) -> str:
    model = zoo.tiny(family)
    units = find_units(model, experts=experts)
    matrices = {name: p.numel() for name, p in decoder_matrices(model, units).items()}
    covered = {f"{u.module_name}.{u.param}" for u in units}
    routers = sum(v for n, v in matrices.items() if n not in covered)
    in_blocks = sum(v for n, v in matrices.items() if n in covered)
    coverage = in_blocks / (sum(matrices.values()) - routers)
    ids = torch.randint(0, 8192, (8, 64), generator=torch.Generator().manual_seed(0))
    plan = bitalloc.allocate(model, 3.2, calibration=ids, experts=experts, cache=False)
    bits = {u.name: plan.layers[u.name].size_bits(u.shape) for u in units}
    expert_bits = sum(b for u in units if u.kind in EXPERT_KINDS for b in [bits[u.name]])
    expert_weights = sum(u.numel for u in units if u.kind in EXPERT_KINDS)
    fake = copy.deepcopy(model)
    quantize_model(fake, units, plan, progress=False)
    bitalloc.apply(model, plan, progress=False)
    loaded = load(save(model, work / f"{family}-{experts}"))
    x = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (loaded(input_ids=x).logits - fake(input_ids=x).logits).abs().max().item()
    share = f"{expert_weights / sum(u.numel for u in units):6.1%}" if expert_weights else "     -"
    expert_bpw = f"{expert_bits / expert_weights:6.3f}" if expert_weights else "     -"
    return (f"{family:<10} {experts:<10} {len(units):>5} {coverage:>9.1%} {routers:>8,} {share} "
            f"{plan.true_bpw:>8.4f} {expert_bpw} {diff:>9.1e}")


def main() -> None:
    print(f"{'family':<10} {'experts':<10} {'units':>5} {'coverage':>9} {'routers':>8} {'expert':>6} "
          f"{'true bpw':>8} {'exp bpw':>6} {'max |Δ|':>9}")
    with tempfile.TemporaryDirectory() as d:
        for family in zoo.FAMILIES:
            for experts in ("per-expert", "per-layer") if family in zoo.MOE_FAMILIES else ("per-expert",):
                print(report(family, experts, Path(d)), flush=True)
    print("coverage: unit weights / the decoder's matrix weights other than MoE routers (kept in full precision); "
          "expert: the experts' share of the unit weights; true bpw: the plan's, experts counted; exp bpw: the "
          "experts' own; max |Δ|: packed, saved and loaded logits against the fake-quantized ones")


if __name__ == "__main__":
    main()
