"""kfac probe: the layer-output error weighted by how much each output channel matters to the loss.

Second-order loss change of a perturbation ΔW, with the Fisher of the layer factored as in K-FAC,
E[(g ⊗ x)(g ⊗ x)ᵀ] ≈ E[g gᵀ] ⊗ E[x xᵀ], and E[g gᵀ] kept diagonal:

    cost = ½ Σ_i  G_i · (ΔW H ΔWᵀ)_ii          G_i = Σ_t (∂ℓ/∂y_ti)²,  H = Σ_t x_t x_tᵀ / n_tokens

g = gradient of the summed next-token loss with respect to the layer's output y (per token), x = its input.
It keeps output_error's input correlations (H) and fisher's loss weighting (G) in one forward+backward pass.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import fake_quantize
from ..units import Unit, unit_weight
from .base import (Probe, Workload, check_loss, check_trainable, grads_only_for,
                   modules_by_name, refuse_experts, streams, unique_params)
from .table import SensitivityTable


def kfac_cost(W: torch.Tensor, G: torch.Tensor, Hn: torch.Tensor, options: list[QuantSpec]) -> torch.Tensor:
    """(O,) float64: ½ Σ_i G_i (ΔW Hn ΔWᵀ)_ii of one unit under each option."""
    W = W.detach().float()
    row = torch.zeros(len(options), dtype=torch.float64)
    for j, spec in enumerate(options):
        dW = (fake_quantize(W, spec) - W).double()
        row[j] = 0.5 * float((G * ((dW @ Hn) * dW).sum(1)).sum())
    return row


class KFACCollector:
    """kfac under block streaming (streamed.py): input XᵀX and squared output gradients of a block's units."""

    def __init__(self, model, options: list[QuantSpec], workload: Workload):
        self.modules, self.options = modules_by_name(model, []), options
        self.terms = getattr(workload, "loss_terms", lambda batch: 1)     # how many terms the loss averages
        self.H: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.n_tokens = 0

    def params(self, units):
        return []                                   # only activations and their gradients

    @contextlib.contextmanager
    def collect(self, units):
        """Forward hooks add each unit's Σ xᵀx to H and hook its output's gradient into G. Units reading one
        input tensor (q/k/v) share its product while the tensor lives."""
        seen: dict[int, torch.Tensor] = {}

        def hook(name):
            def fn(module, args, output):
                x = args[0]
                if id(x) not in seen:
                    x2 = x.detach().reshape(-1, x.shape[-1]).float()
                    seen[id(x)] = (x2.T @ x2).double()
                    weakref.finalize(x, seen.pop, id(x), None)      # gone with x: an id is never reused stale
                self.H[name] = self.H.get(name, 0) + seen[id(x)]
                output.register_hook(lambda g: self.G.__setitem__(
                    name, self.G.get(name, 0) + g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)))
            return fn

        handles = [self.modules[u.module_name].register_forward_hook(hook(u.name)) for u in units]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            seen.clear()

    def reduce(self, cost, rows, units, steps):
        for j, u in zip(rows, units):
            cost[j] = kfac_cost(unit_weight(self.modules, u), self.G.pop(u.name), self.H.pop(u.name) / self.n_tokens,
                                self.options)

    def loss_scale(self, batch):
        self.n_tokens += batch.numel()
        return self.terms(batch)                    # the summed per-token loss


@dataclass(frozen=True)
class KFACProbe(Probe):
    name = "kfac"
    needs_grad = True
    micro_batch: int = 4
    stream: str = "auto"                  # one decoder block at a time (streamed.py): auto, on, off

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        model = workload.model
        refuse_experts(units, self.name)
        if streams(workload, units, self.stream):
            from .streamed import streamed_costs
            collector = KFACCollector(model, options, workload)
            cost, _ = streamed_costs(workload, units, options, collector, micro_batch=self.micro_batch,
                                     desc="kfac (streamed)")
            return self.table(units, options, cost, n_tokens=collector.n_tokens, streamed=True)
        check_trainable(model, units)
        collector = KFACCollector(model, options, workload)
        first = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        handles = []
        if first is not None:  # gradients must flow to every layer although no weight requires them
            handles.append(first.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        # a plain module without an embedding hook: let the units' weights carry the graph
        carriers = [] if first is not None else unique_params(model, units)[0]
        tokens = torch.cat(list(workload.batches()))
        try:
            with grads_only_for(model, carriers), collector.collect(units):
                for i in tqdm(range(0, len(tokens), self.micro_batch), desc="kfac", leave=False):
                    batch = tokens[i:i + self.micro_batch]
                    loss = workload.loss(batch)
                    check_loss(loss, f"calibration windows {i}..{i + len(batch) - 1}")
                    (loss * collector.loss_scale(batch)).backward()           # summed per-token loss
        finally:
            for h in handles:
                h.remove()
        n_tokens = collector.n_tokens
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        collector.reduce(cost, list(range(len(units))), units, 0)
        return self.table(units, options, cost, n_tokens=n_tokens, streamed=False)
