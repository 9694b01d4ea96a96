"""Fitness of a whole plan, measured on the model: what the search solvers (evolutionary, optuna) optimize.

``KLFitness`` scores a plan by swapping in only the units whose option differs from the weights currently
loaded, quantizing them on the fly (RTN), then running the first ``n_windows`` calibration windows; it
returns the mean KL(fp ‖ quantized) per token (1 − cosine for encoders), against fp outputs computed once.
Memory: one copy of the units' fp weights in the model's dtype (to quantize from and restore), never a
weight set per option; the fp reference logits in float32, or in bf16 once they pass 1 GiB.
"""
from __future__ import annotations

import torch

from .quantize import fake_quantize
from .units import set_unit_weight, unit_weight


REFERENCE_FP32_BYTES = 1 << 30   # fp reference logits beyond this are kept in bf16 (128k vocab: 256 MB a window)


class KLFitness:
    def __init__(self, prepared, *, max_windows: int | None = None):
        self.workload = prepared.workload
        if max_windows is not None:
            self.workload = self.workload.subset(max_windows)
        self.units, self.options = prepared.units, prepared.options
        self.max_windows = len(self.workload.tokens)
        self.modules = dict(prepared.model.named_modules())
        self.fp_weights = {u.name: unit_weight(self.modules, u).detach().clone() for u in self.units}
        self.loaded: list[int | None] = [None] * len(self.units)        # None: fp weights
        self.evaluations = 0
        with torch.no_grad():
            self.reference = [self.workload.logits(b) for b in self.workload.batches()]
        if sum(r.numel() for r in self.reference) * 4 > REFERENCE_FP32_BYTES:     # large vocabularies
            self.reference = [r.to(torch.bfloat16) for r in self.reference]

    def _load(self, choice) -> None:
        for i, (u, j) in enumerate(zip(self.units, choice)):
            j = int(j)
            if self.loaded[i] != j:
                set_unit_weight(self.modules, u, fake_quantize(self.fp_weights[u.name].float(), self.options[j]))
                self.loaded[i] = j

    def restore(self) -> None:
        """Put the fp weights back (the model is borrowed, not owned)."""
        for i, u in enumerate(self.units):
            if self.loaded[i] is not None:
                set_unit_weight(self.modules, u, self.fp_weights[u.name])
                self.loaded[i] = None

    @torch.no_grad()
    def __call__(self, choice, n_windows: int | None = None) -> float:
        """Mean divergence over the first ``n_windows`` windows (all by default) of the plan ``choice``
        (one option index per unit, in ``units`` order)."""
        self._load(choice)
        n = self.max_windows if n_windows is None else min(n_windows, self.max_windows)
        total, seen = 0.0, 0
        for k, batch in enumerate(self.workload.batches()):
            if seen >= n:
                break
            batch = batch[: n - seen]
            ref = self.reference[k][: len(batch)]
            total += float(self.workload.divergence(ref, self.workload.logits(batch))) * len(batch)
            seen += len(batch)
        self.evaluations += 1
        return total / seen
