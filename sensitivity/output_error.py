"""output_error probe: the layer-output error a format causes, cost = tr(ΔW H ΔWᵀ) / n_tokens.

H = XᵀX over the calibration tokens X (n_tokens, in) entering the layer, collected by forward hooks, so the
cost is the summed squared error of the layer's output, ‖X ΔWᵀ‖²_F, with ΔW = Q(W) − W under RTN. It does
not know how a layer's error reaches the loss (see BENCHMARK.md): cheap, and a good within-layer ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import fake_quantize
from ..units import Unit, unit_weight
from .base import Probe, Workload, modules_by_name, refuse_experts
from .table import SensitivityTable


def collect_hessians(workload: Workload, units: list[Unit], *, desc: str = "collect XᵀX") -> tuple[dict[str, torch.Tensor], int]:
    """H[name] = Σ xᵀx over calibration tokens entering each unit (in, in), float64; and the token count.

    Units reading the same input tensor (q/k/v) share one H. Embedding units get the diagonal of token
    counts in their place (their "input" is a one-hot token)."""
    modules = modules_by_name(workload.model, units)
    H: dict[str, torch.Tensor] = {}
    counts = {"tokens": 0}
    handles = []
    seen: dict[tuple, torch.Tensor] = {}   # one XᵀX per input tensor per batch (q/k/v share theirs)

    def hook(name, kind):
        def fn(module, args, output):
            x = args[0]
            if kind == "embedding":
                ids = x.reshape(-1)
                counts_vec = torch.bincount(ids, minlength=module.weight.shape[0]).double()
                H[name] = H.get(name, 0) + counts_vec
                return
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen:
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                seen[key] = (x2.T @ x2).double()
            H[name] = H.get(name, 0) + seen[key]
        return fn

    for unit in units:
        handles.append(modules[unit.module_name].register_forward_hook(hook(unit.name, unit.kind)))
    try:
        with torch.no_grad():
            for batch in tqdm(workload.batches(), total=workload.n_batches(), desc=desc, leave=False):
                seen.clear()
                workload.logits(batch)
                counts["tokens"] += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return H, counts["tokens"]


def output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW (out, in) and H (in, in); for embeddings H is a (out,) count vector."""
    dW = dW.double()
    if H.dim() == 1:
        return float((H[:, None] * dW * dW).sum())
    return float(((dW @ H) * dW).sum())


@dataclass(frozen=True)
class OutputErrorProbe(Probe):
    name = "output_error"
    samples_meta = "n_tokens"

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        refuse_experts(units, self.name)
        H, n_tokens = collect_hessians(workload, units)
        modules = modules_by_name(workload.model, units)
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        for i, unit in enumerate(tqdm(units, desc="output_error costs", leave=False)):
            W = unit_weight(modules, unit).detach().float()
            Hu = H[unit.name]
            for j, spec in enumerate(options):
                cost[i, j] = output_error(fake_quantize(W, spec) - W, Hu) / n_tokens
        return self.table(units, options, cost, n_tokens=n_tokens)
