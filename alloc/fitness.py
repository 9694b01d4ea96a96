"""Fitness of a whole plan, measured on the model: what the search solvers (evolutionary, optuna) optimize.

``KLFitness`` quantizes every option of every unit ONCE (RTN) and keeps the weights in memory; scoring a
plan swaps in only the units whose option differs from the weights currently loaded, runs the first
``n_windows`` calibration windows and returns the mean KL(fp ‖ quantized) per token (1 − cosine for
encoders), against fp outputs computed once.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .quantize import fake_quantize
from .units import set_unit_weight, unit_weight


class KLFitness:
    def __init__(self, prepared, *, max_windows: int | None = None, progress: bool = True):
        self.workload = prepared.workload
        if max_windows is not None:
            self.workload = self.workload.subset(max_windows)
        self.units, self.options = prepared.units, prepared.options
        self.max_windows = len(self.workload.tokens)
        self.modules = dict(prepared.model.named_modules())
        self.fp_weights = {u.name: unit_weight(self.modules, u).detach().clone() for u in self.units}
        self.weights = [[fake_quantize(self.fp_weights[u.name], o) for o in self.options]
                        for u in tqdm(self.units, desc="quantize every option", leave=False, disable=not progress)]
        self.loaded: list[int | None] = [None] * len(self.units)        # None: fp weights
        self.evaluations = 0
        with torch.no_grad():
            self.reference = [self.workload.logits(b) for b in self.workload.batches()]

    def _load(self, choice) -> None:
        for i, (u, j) in enumerate(zip(self.units, choice)):
            j = int(j)
            if self.loaded[i] != j:
                set_unit_weight(self.modules, u, self.weights[i][j])
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
