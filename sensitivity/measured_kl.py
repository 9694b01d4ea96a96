"""measured_kl: the ground truth. For every unit × option, quantize that ONE unit (RTN), measure the mean
KL(fp ‖ quantized) of the next-token distribution over calibration windows, restore the weight.

Slow by nature (units × options forward passes over ``n_windows``); its table is cached like any other.
For encoders the divergence is 1 − cosine of the sentence embeddings.

Streamed (``stream="on"``, and ``auto`` for every causal LM made of decoder blocks): one decoder block at a
time (alloc/models/stream.py). The fp hidden state entering block b is computed once; each unit of block
b is quantized in turn and block b run on that state, giving one perturbed state per unit × option; those
states then visit blocks b+1 … L−1 together (each block is put on the compute device once per group, not
once per unit × option) and end in the LM head, where their KL to the fp logits is taken. Same windows,
same batches of 4, same operations: the table equals the whole-model one (tests/scale/test_streaming.py). The
perturbed states of a group are capped at ``STATE_BYTES`` on the host; a block with more units × options
(MoE experts) is done in several groups.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import DEFAULTS, Quantizer
from ..units import Unit, set_unit_weight, unit_weight
from .base import Probe, Workload, modules_by_name, streams, tied_to_embeddings
from .table import SensitivityTable

WINDOWS_PER_BATCH = 4
STATE_BYTES = 2 << 30       # host memory for the perturbed hidden states of one group (streamed path)
REF_LOGITS_BYTES = 1 << 30  # the fp logits at the scored positions are kept up to this size, else recomputed


@dataclass(frozen=True)
class MeasuredKLProbe(Probe):
    name = "measured_kl"
    n_windows: int = 8
    stream: str = "auto"                  # one decoder block at a time: auto, on, off
    quantizer: str = "rtn"                # rtn, or gptq (each unit on its own XᵀX from the fp model)
    stride: int = 1                       # the KL at every stride-th position (the LM head's cost; streamed path)

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        tokens = torch.cat(list(workload.batches()))[: self.n_windows]
        batches = [tokens[i:i + WINDOWS_PER_BATCH] for i in range(0, len(tokens), WINDOWS_PER_BATCH)]
        if self._streamed(workload, units):
            cost = streamed_measured_kl(workload, units, options, batches, self.rounding, self.stride)
            return self.table(units, options, cost, n_windows=len(tokens), streamed=True)
        modules = modules_by_name(workload.model, units)
        H = _hessians(workload, units, batches) if self.rounding.method == "gptq" else {}
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        with torch.no_grad():
            reference = [workload.logits(b) for b in batches]
            bar = tqdm(total=len(units) * len(options), desc="measured_kl", leave=False)
            for i, unit in enumerate(units):
                for j, spec in enumerate(options):
                    with _Quantized(modules, unit, spec, self.rounding, H.get(unit.name)):
                        kl = sum(float(workload.divergence(ref, workload.logits(b))) * len(b)
                                 for ref, b in zip(reference, batches)) / len(tokens)
                    cost[i, j] = max(kl, 0.0)
                    bar.update()
            bar.close()
        return self.table(units, options, cost, n_windows=len(tokens))


    def _streamed(self, workload: Workload, units: list[Unit]) -> bool:
        """auto: block by block whenever the model is a causal LM of decoder blocks; it is the cheaper path
        (each unit's perturbed state runs only the blocks after it) and keeps no reference logits."""
        from ..units import find_blocks
        if self.stream == "auto" and getattr(workload, "can_stream", False) and getattr(workload, "compute_device",
                                                                                       None) is None:
            return bool(find_blocks(workload.model, units))
        return streams(workload, units, self.stream)


def _hessians(workload, units, batches) -> dict[str, torch.Tensor]:
    """XᵀX of every unit on the probe's windows, the fp model throughout (for GPTQ)."""
    from .output_error import hessian_hooks
    H: dict[str, torch.Tensor] = {}
    with hessian_hooks(modules_by_name(workload.model, units), units, H) as new_batch, torch.no_grad():
        for b in batches:
            new_batch()
            workload.run(b)
    return H


class _Quantized:
    """While active, ``unit`` holds its ``spec``-quantized weight by ``quantizer`` (GPTQ on ``H``), on whatever
    device its data is now."""

    def __init__(self, modules, unit: Unit, spec: QuantSpec, quantizer: Quantizer = DEFAULTS["rtn"],
                 H: torch.Tensor | None = None):
        self.modules, self.unit, self.spec, self.quantizer, self.H = modules, unit, spec, quantizer, H

    def __enter__(self):
        self.W = unit_weight(self.modules, self.unit).detach().clone()
        set_unit_weight(self.modules, self.unit, self.quantizer.fake(self.W, self.spec, self.H))

    def __exit__(self, *exc):
        set_unit_weight(self.modules, self.unit, self.W)


def streamed_measured_kl(workload: Workload, units: list[Unit], options: list[QuantSpec],
                         batches: list[torch.Tensor], quantizer: Quantizer = DEFAULTS["rtn"],
                         stride: int = 1) -> torch.Tensor:
    """cost (U, O) float64, one decoder block at a time (see the module docstring)."""
    stream = workload.stream(units)
    modules = modules_by_name(workload.model, units)
    n_blocks, device = len(stream.blocks), stream.device
    # where each unit acts first: its block, -1 before the blocks (embeddings, and an LM head tied to them),
    # n_blocks after them (an untied LM head)
    tied = {u.name for u in tied_to_embeddings(workload.model, units)}
    where = [b if (b := stream.block_of(u)) is not None else
             (-1 if u.kind == "embedding" or u.name in tied else n_blocks) for u in units]
    n_windows = sum(len(b) for b in batches)
    cost = torch.zeros(len(units), len(options), dtype=torch.float64)
    bar = tqdm(total=len(units) * len(options), desc="measured_kl (streamed)", leave=False)

    def run(i, states):
        """Block i on every state (a list over batches of host hidden states)."""
        with stream.block_on_device(i):
            return [[stream.run_block(i, h.to(device), e).cpu() for h, e in zip(s, extras)] for s in states]

    def score(pairs, states):
        """KL of each pair's final hidden states (None: the fp ones) against the fp logits, batch by batch,
        the LM head a few positions at a time (alloc/models/head.py). Units outside the blocks are quantized
        again for the logits: an LM head, or an embedding whose weight the head shares (quantizing an untied
        embedding there changes nothing)."""
        for k, b in enumerate(batches):
            for (j, o), s in zip(pairs, states):
                outside = where[j] in (-1, n_blocks)
                scored = (lambda: _Quantized(modules, units[j], options[o], quantizer, H.get(units[j].name))) \
                    if outside else None
                kl = head.kl(final[k].to(device), (final[k] if s is None else s[k]).to(device), b.to(device),
                             stride=stride, ref=refs[k], head=scored)
                cost[j, o] += float(kl.sum()) / n_windows          # kl: per window, mean over its tokens

    head = workload.head(stream)
    H: dict[str, torch.Tensor] = {}                             # XᵀX of the units GPTQ needs, block by block

    def hessians(i, states):
        """Block i on the fp states with the XᵀX of its units collected (GPTQ), as ``run`` does."""
        if quantizer.method != "gptq":
            return run(i, [states])[0]
        from .output_error import hessian_hooks
        block_units = [u for u, b in zip(units, where) if b == i]
        with hessian_hooks(modules, block_units, H) as new_batch:
            with stream.block_on_device(i):
                out = []
                for h, e in zip(states, extras):
                    new_batch()
                    out.append(stream.run_block(i, h.to(device), e).cpu())
        return out

    with torch.no_grad(), stream.resident():
        firsts = [stream.inputs(b) for b in batches]
        extras = [extra for _, extra in firsts]
        entering = [h.cpu() for h, _ in firsts]
        final = entering
        for i in range(n_blocks):
            final = hessians(i, final)
        if quantizer.method == "gptq" and any(p in (-1, n_blocks) for p in where):
            H.update(_hessians(workload, [u for u, p in zip(units, where) if p in (-1, n_blocks)], batches))
        vocab, T = head.vocab, batches[0].shape[1]
        keep = n_windows * -(-T // stride) * vocab * final[0].element_size() <= REF_LOGITS_BYTES
        refs = [head.reference(f.to(device), b.to(device), stride=stride) if keep else None
                for f, b in zip(final, batches)]
        boundary = entering                                     # fp hidden state entering block p
        state_bytes = sum(h.numel() * h.element_size() for h in entering)
        group = max(1, STATE_BYTES // max(state_bytes, 1))
        for p in range(-1, n_blocks + 1):
            pairs = [(j, o) for j in range(len(units)) if where[j] == p for o in range(len(options))]
            for g in range(0, len(pairs), group):
                chunk = pairs[g:g + group]
                if p == n_blocks:
                    score(chunk, [None] * len(chunk))
                else:
                    states = []
                    with stream.block_on_device(p) if p >= 0 else contextlib.nullcontext():
                        for j, o in chunk:
                            with _Quantized(modules, units[j], options[o], quantizer, H.get(units[j].name)):
                                if p == -1:
                                    states.append([stream.inputs(b)[0].cpu() for b in batches])
                                else:
                                    states.append([stream.run_block(p, h.to(device), e).cpu()
                                                   for h, e in zip(boundary, extras)])
                    for i in range(p + 1, n_blocks):
                        states = run(i, states)
                    score(chunk, states)
                bar.update(len(chunk))
            if 0 <= p < n_blocks:
                boundary = run(p, [boundary])[0]
    bar.close()
    return cost.clamp_(min=0.0)
