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
from ..units import Unit, unit_slice, unit_weight
from .base import (Probe, Workload, check_loss, check_trainable, grads_only_for,
                   modules_by_name, streams, unique_params)
from .table import SensitivityTable


def empirical_fisher(workload: Workload, units: list[Unit], *, micro_batch: int = 1,
                     max_windows: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """F[name] (out, in) = mean over micro-batches of (∂loss/∂W)², float32; and the number of micro-batches.

    The whole-model path: one backward pass through the full model per micro-batch (sensitivity/streamed.py
    gives the same numbers one decoder block at a time)."""
    model = workload.model
    check_trainable(model, units)
    params, index = unique_params(model, units)
    Fp = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    tokens = torch.cat(list(workload.batches()))
    if max_windows is not None:
        tokens = tokens[:max_windows]
    steps = 0
    with grads_only_for(model, params):
        for i in tqdm(range(0, len(tokens), micro_batch), desc="fisher", leave=False):
            batch = tokens[i:i + micro_batch]
            loss = workload.loss(batch)
            check_loss(loss, f"calibration windows {i}..{i + len(batch) - 1}")
            grads = torch.autograd.grad(loss, params)
            for acc, g in zip(Fp, grads):
                acc += g.float() ** 2
            steps += 1
    F = {u.name: unit_slice(Fp[k], u) / steps for u, k in zip(units, index)}
    return F, steps


def fisher_cost(F: torch.Tensor, dW: torch.Tensor) -> float:
    return 0.5 * float((F.double() * dW.double() ** 2).sum())


def fisher_row_costs(F: torch.Tensor, W: torch.Tensor, options: list[QuantSpec], rows: int = 1024) -> torch.Tensor:
    """(out, O) float64: ½ Σ_k F[r, k] (Q(W) − W)[r, k]² of each output row r under each option (W in any
    float dtype), ``rows`` rows at a time (quantization groups never span rows), so temporaries stay small.
    A row's cost does not depend on the other rows' widths: this is the table of per-row plans."""
    cost = torch.zeros(W.shape[0], len(options), dtype=torch.float64)
    for r in range(0, W.shape[0], rows):
        Wr = W[r:r + rows].detach().float()
        Fr = F[r:r + rows].double()
        for j, spec in enumerate(options):
            cost[r:r + rows, j] = 0.5 * (Fr * (fake_quantize(Wr, spec) - Wr).double() ** 2).sum(1)
    return cost


def group_costs(F: torch.Tensor, dW: torch.Tensor, columns: int) -> torch.Tensor:
    """½ Σ F ⊙ ΔW² per group of ``columns`` input columns: (ceil(in / columns),)."""
    e = 0.5 * (F.double() * dW.double() ** 2).sum(0)              # (in,)
    pad = (-e.numel()) % columns
    return torch.nn.functional.pad(e, (0, pad)).view(-1, columns).sum(1)


@dataclass(frozen=True)
class FisherProbe(Probe):
    name = "fisher"
    needs_grad = True
    samples_meta = "gradient_samples"
    gives_rows = True
    micro_batch: int = 1                  # windows per gradient sample
    max_windows: int | None = None        # None: every calibration window
    stream: str = "auto"                  # one decoder block at a time (streamed.py): auto, on, off

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        if streams(workload, units, self.stream):
            from .streamed import streamed_fisher_costs
            rows: dict[int, torch.Tensor] = {}
            cost, steps = streamed_fisher_costs(workload, units, options, micro_batch=self.micro_batch,
                                                max_windows=self.max_windows, costs_fn=fisher_row_costs,
                                                rows_out=rows)
            row_cost = torch.cat([rows[i] for i in range(len(units))])
            return self.table(units, options, cost, row_cost, gradient_samples=steps, streamed=True)
        F, steps = empirical_fisher(workload, units, micro_batch=self.micro_batch, max_windows=self.max_windows)
        modules = modules_by_name(workload.model, units)
        rows = [fisher_row_costs(F[u.name], unit_weight(modules, u), options) for u in units]
        return self.table(units, options, torch.stack([r.sum(0) for r in rows]), torch.cat(rows),
                          gradient_samples=steps, streamed=False)
