"""fisher probe: diagonal empirical Fisher, cost = ½ Σ F ⊙ (Q(W) − W)².

F = mean over calibration micro-batches of the squared gradient of the LM loss (one window per micro-batch
by default), the second-order term of the loss change under a small weight perturbation ΔW (Fisher ≈ the
Gauss-Newton Hessian near a trained optimum). Unlike output_error it sees how each layer's error reaches
the loss. Costs are also available per group of input columns (``group_costs``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import fake_quantize
from ..units import Unit, weight_matrix
from .base import Probe, Workload, check_loss, check_trainable, grads_only_for, modules_by_name
from .table import SensitivityTable


def empirical_fisher(workload: Workload, units: list[Unit], *, micro_batch: int = 1,
                     max_windows: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """F[name] (out, in) = mean over micro-batches of (∂loss/∂W)²; and the number of micro-batches."""
    model = workload.model
    check_trainable(model, units)
    modules = modules_by_name(model, units)
    F = {u.name: torch.zeros_like(modules[u.name].weight, dtype=torch.float32) for u in units}
    tokens = torch.cat(list(workload.batches()))
    if max_windows is not None:
        tokens = tokens[:max_windows]
    steps = 0
    with grads_only_for(model, [modules[u.name].weight for u in units]):
        for i in tqdm(range(0, len(tokens), micro_batch), desc="fisher", leave=False):
            batch = tokens[i:i + micro_batch]
            loss = workload.loss(batch)
            check_loss(loss, f"calibration windows {i}..{i + len(batch) - 1}")
            grads = torch.autograd.grad(loss, [modules[u.name].weight for u in units])
            for u, g in zip(units, grads):
                F[u.name] += g.float() ** 2
            steps += 1
    for u in units:
        F[u.name] /= steps
        if u.kind == "conv1d":
            F[u.name] = F[u.name].t()
    return F, steps


def fisher_cost(F: torch.Tensor, dW: torch.Tensor) -> float:
    return 0.5 * float((F.double() * dW.double() ** 2).sum())


def group_costs(F: torch.Tensor, dW: torch.Tensor, columns: int) -> torch.Tensor:
    """½ Σ F ⊙ ΔW² per group of ``columns`` input columns: (ceil(in / columns),)."""
    e = 0.5 * (F.double() * dW.double() ** 2).sum(0)              # (in,)
    pad = (-e.numel()) % columns
    return torch.nn.functional.pad(e, (0, pad)).view(-1, columns).sum(1)


@dataclass(frozen=True)
class FisherProbe(Probe):
    name = "fisher"
    needs_grad = True
    micro_batch: int = 1                  # windows per gradient sample
    max_windows: int | None = None        # None: every calibration window

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        F, steps = empirical_fisher(workload, units, micro_batch=self.micro_batch, max_windows=self.max_windows)
        modules = modules_by_name(workload.model, units)
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        for i, unit in enumerate(units):
            W = weight_matrix(modules[unit.name], unit.kind).detach().float()
            for j, spec in enumerate(options):
                cost[i, j] = fisher_cost(F[unit.name], fake_quantize(W, spec) - W)
        return self.table(units, options, cost, gradient_samples=steps)
