"""measured_kl: the ground truth. For every unit × option, quantize that ONE unit (RTN), measure the mean
KL(fp ‖ quantized) of the next-token distribution over calibration windows, restore the weight.

Slow by nature (units × options forward passes over ``n_windows``); its table is cached like any other.
For encoders the divergence is 1 − cosine of the sentence embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import fake_quantize
from ..units import Unit, set_unit_weight, unit_weight
from .base import Probe, Workload, modules_by_name
from .table import SensitivityTable


@dataclass(frozen=True)
class MeasuredKLProbe(Probe):
    name = "measured_kl"
    n_windows: int = 8

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        modules = modules_by_name(workload.model, units)
        tokens = torch.cat(list(workload.batches()))[: self.n_windows]
        batches = [tokens[i:i + 4] for i in range(0, len(tokens), 4)]
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        with torch.no_grad():
            reference = [workload.logits(b) for b in batches]
            bar = tqdm(total=len(units) * len(options), desc="measured_kl", leave=False)
            for i, unit in enumerate(units):
                W = unit_weight(modules, unit).detach().clone()
                try:
                    for j, spec in enumerate(options):
                        set_unit_weight(modules, unit, fake_quantize(W.float(), spec))
                        kl = sum(float(workload.divergence(ref, workload.logits(b))) * len(b)
                                 for ref, b in zip(reference, batches)) / len(tokens)
                        cost[i, j] = max(kl, 0.0)
                        bar.update()
                finally:
                    set_unit_weight(modules, unit, W)
            bar.close()
        return self.table(units, options, cost, n_windows=len(tokens))
