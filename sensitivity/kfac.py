"""kfac probe: the layer-output error weighted by how much each output channel matters to the loss.

Second-order loss change of a perturbation ΔW, with the Fisher of the layer factored as in K-FAC,
E[(g ⊗ x)(g ⊗ x)ᵀ] ≈ E[g gᵀ] ⊗ E[x xᵀ], and E[g gᵀ] kept diagonal:

    cost = ½ Σ_i  G_i · (ΔW H ΔWᵀ)_ii          G_i = Σ_t (∂ℓ/∂y_ti)²,  H = Σ_t x_t x_tᵀ / n_tokens

g = gradient of the summed next-token loss with respect to the layer's output y (per token), x = its input.
It keeps output_error's input correlations (H) and fisher's loss weighting (G) in one forward+backward pass.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import fake_quantize
from ..units import Unit, unit_weight
from .base import (Probe, Workload, check_loss, check_stream_mode, check_trainable, grads_only_for,
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

    def __init__(self, model, options: list[QuantSpec]):
        self.modules, self.options = modules_by_name(model, []), options
        self.H: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.n_tokens = 0

    def params(self, units):
        return []                                   # only activations and their gradients

    @contextlib.contextmanager
    def collect(self, units):
        seen: dict[tuple, tuple] = {}

        def hook(name):
            def fn(module, args, output):
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape))
                if key not in seen or seen[key][0] is not x:    # x is held, so its address is not reused
                    x2 = x.detach().reshape(-1, x.shape[-1]).float()
                    seen[key] = (x, (x2.T @ x2).double())
                self.H[name] = self.H.get(name, 0) + seen[key][1]
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
        return batch.numel() - len(batch)           # the summed per-token loss (CausalLMWorkload.loss_terms)


@dataclass(frozen=True)
class KFACProbe(Probe):
    name = "kfac"
    needs_grad = True
    micro_batch: int = 4
    stream: str = "auto"                  # one decoder block at a time (streamed.py): auto, on, off

    def __post_init__(self) -> None:
        check_stream_mode(self.stream)

    def settings(self) -> dict:
        return {k: v for k, v in super().settings().items() if k != "stream"}     # same numbers either way

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        model = workload.model
        refuse_experts(units, self.name)
        if streams(workload, units, self.stream):
            from .streamed import streamed_costs
            collector = KFACCollector(model, options)
            cost, _ = streamed_costs(workload, units, options, collector, micro_batch=self.micro_batch,
                                     desc="kfac (streamed)")
            return self.table(units, options, cost, n_tokens=collector.n_tokens, streamed=True)
        check_trainable(model, units)
        modules = modules_by_name(model, units)
        H: dict[str, torch.Tensor] = {}
        G: dict[str, torch.Tensor] = {}
        seen: dict[tuple, torch.Tensor] = {}
        n_tokens = 0

        def forward_hook(name):
            def fn(module, args, output):
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape))
                if key not in seen or seen[key][0] is not x:    # x is held, so its address is not reused
                    x2 = x.detach().reshape(-1, x.shape[-1]).float()
                    seen[key] = (x, (x2.T @ x2).double())
                H[name] = H.get(name, 0) + seen[key][1]
                output.register_hook(lambda g: G.__setitem__(
                    name, G.get(name, 0) + g.detach().reshape(-1, g.shape[-1]).double().pow(2).sum(0)))
            return fn

        first = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        handles = [modules[u.module_name].register_forward_hook(forward_hook(u.name)) for u in units]
        if first is not None:  # gradients must flow to every layer although no weight requires them
            handles.append(first.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        # a plain module without an embedding hook: let the units' weights carry the graph
        carriers = [] if first is not None else unique_params(model, units)[0]
        tokens = torch.cat(list(workload.batches()))
        try:
            with grads_only_for(model, carriers):
                for i in tqdm(range(0, len(tokens), self.micro_batch), desc="kfac", leave=False):
                    batch = tokens[i:i + self.micro_batch]
                    seen.clear()
                    loss = workload.loss(batch)
                    check_loss(loss, f"calibration windows {i}..{i + len(batch) - 1}")
                    terms = workload.loss_terms(batch) if hasattr(workload, "loss_terms") else 1
                    (loss * terms).backward()                                 # summed per-token loss
                    n_tokens += batch.numel()
        finally:
            for h in handles:
                h.remove()
        cost = torch.stack([kfac_cost(unit_weight(modules, u), G[u.name], H[u.name] / n_tokens, options)
                            for u in units])
        return self.table(units, options, cost, n_tokens=n_tokens, streamed=False)
