"""Fitness of a whole plan, measured on the model: what the search solvers (evolutionary, optuna) optimize.

``KLFitness`` scores a plan by swapping in only the units whose option differs from the weights currently
loaded, quantizing them on the fly (RTN), then running the first ``n_windows`` calibration windows; it
returns the mean KL(fp ‖ quantized) per token (1 − cosine for encoders), against fp outputs computed once.
Memory: one copy of the units' fp weights in the model's dtype (to quantize from and restore), never a
weight set per option; the fp reference logits in float32, or in bf16 once they pass 1 GiB.
``StreamedKLFitness`` gives the same numbers one decoder block at a time, with no weight copy at all
(``make_fitness`` picks it for large models and for weights kept on the host).
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


class _Choice:
    """A plan-like view of one option index per unit (what evaluate._fake_quantized reads)."""

    def __init__(self, units, options, choice):
        self.layers = {u.name: options[int(j)] for u, j in zip(units, choice)}
        self.row_bits: dict = {}


class StreamedKLFitness:
    """``KLFitness`` one decoder block at a time (alloc/models/stream.py), for models whose weights stay on the host
    or whose fp copy would be large: each evaluation carries the windows' hidden states through every block
    with that block's units RTN-quantized by the plan (on the compute device when there is one; restored
    after), then takes the KL at the LM head against fp logits computed once. No copy of the model's weights
    is kept; each evaluation quantizes every unit again (no loaded-option cache)."""

    def __init__(self, prepared, *, max_windows: int | None = None):
        from .models.stream import BlockStream
        self.workload = prepared.workload
        if max_windows is not None:
            self.workload = self.workload.subset(max_windows)
        self.units, self.options = prepared.units, prepared.options
        self.max_windows = len(self.workload.tokens)
        self.stream = BlockStream(prepared.model, self.units, getattr(prepared, "compute_device", None))
        self.modules = dict(prepared.model.named_modules())
        self.where = [self.stream.block_of(u) for u in self.units]
        self.evaluations = 0
        self.reference = [r.float() for r in self._logits(None, self.max_windows)]
        if sum(r.numel() for r in self.reference) * 4 > REFERENCE_FP32_BYTES:
            self.reference = [r.to(torch.bfloat16) for r in self.reference]

    @torch.no_grad()
    def _logits(self, choice, n: int) -> list[torch.Tensor]:
        """Per batch of the first ``n`` windows: the logits with ``choice``'s units quantized (None: fp)."""
        from .evaluate import _fake_quantized
        plan = _Choice(self.units, self.options, choice) if choice is not None else None
        stream = self.stream

        def quantized(block):
            members = [u for u, b in zip(self.units, self.where) if b == block] if plan is not None else []
            return _fake_quantized(self.modules, members, plan)
        batches, seen = [], 0
        for batch in self.workload.batches():
            if seen >= n:
                break
            batches.append(batch[: n - seen])
            seen += len(batches[-1])
        with stream.resident():
            with quantized(None):                                  # an LM head tied to the embeddings
                hidden = [stream.inputs(b) for b in batches]
            for i in range(len(stream.blocks)):
                with stream.block_on_device(i), quantized(i):
                    hidden = [(stream.run_block(i, h, extra), extra) for h, extra in hidden]
            with quantized(None):
                return [stream.logits(h, b).float() for (h, _), b in zip(hidden, batches)]

    def restore(self) -> None:
        """Nothing to put back: every evaluation restores the weights it quantized."""

    def __call__(self, choice, n_windows: int | None = None) -> float:
        n = self.max_windows if n_windows is None else min(n_windows, self.max_windows)
        logits = self._logits(choice, n)
        total = sum(float(self.workload.divergence(ref[: len(out)], out)) * len(out)
                    for ref, out in zip(self.reference, logits))
        self.evaluations += 1
        return total / sum(len(out) for out in logits)


def make_fitness(prepared, *, max_windows: int | None = None):
    """KLFitness, or its block-streamed twin when the weights stay on the host or their fp copy would pass
    1 GiB (a causal LM with decoder blocks and no embedding units)."""
    from .sensitivity.base import STREAM_ABOVE_BYTES
    from .units import find_blocks
    model, units = prepared.model, prepared.units
    can_stream = prepared.kind == "causal_lm" and bool(find_blocks(model, units)) \
        and not any(u.kind == "embedding" for u in units)
    copy_bytes = sum(u.numel for u in units) * next(model.parameters()).element_size()
    host_weights = getattr(prepared, "compute_device", None) is not None
    if can_stream and (host_weights or copy_bytes > STREAM_ABOVE_BYTES):
        return StreamedKLFitness(prepared, max_windows=max_windows)
    return KLFitness(prepared, max_windows=max_windows)
