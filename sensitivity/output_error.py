"""output_error probe: the layer-output error a format causes, cost = tr(ΔW H ΔWᵀ) / n_tokens.

H = XᵀX over the calibration tokens X (n_tokens, in) entering the layer, collected by forward hooks, so the
cost is the summed squared error of the layer's output, ‖X ΔWᵀ‖²_F, with ΔW = Q(W) − W under RTN. It does
not know how a layer's error reaches the loss (see BENCHMARK.md): cheap, and a good within-layer ranking.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import DEFAULTS, Quantizer
from ..units import Unit, unit_weight
from ..errors import BitallocError
from .base import Probe, Workload, modules_by_name, refuse_experts, streams
from .table import SensitivityTable


@contextlib.contextmanager
def hessian_hooks(modules, units: list[Unit], H: dict[str, torch.Tensor]):
    """While active, every forward of a unit's module adds Σ xᵀx of its input (float64) to ``H[unit.name]``.
    Yields ``new_batch()``, to call before each batch: units reading the same input tensor (q/k/v) share one
    product per batch. Embedding units get the diagonal of token counts (their input is a one-hot token)."""
    seen: dict[tuple, torch.Tensor] = {}

    def hook(name, kind):
        def fn(module, args, output):
            x = args[0]
            if kind == "embedding":
                ids = x.reshape(-1)
                counts_vec = torch.bincount(ids, minlength=module.weight.shape[0]).double()
                H[name] = H.get(name, 0) + counts_vec
                return
            key = (x.data_ptr(), tuple(x.shape))
            if key not in seen or seen[key][0] is not x:        # x is held, so its address is not reused
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                seen[key] = (x, (x2.T @ x2).double())
            H[name] = H.get(name, 0) + seen[key][1]
        return fn

    handles = [modules[u.module_name].register_forward_hook(hook(u.name, u.kind)) for u in units]
    try:
        yield seen.clear
    finally:
        for h in handles:
            h.remove()


def collect_hessians(workload: Workload, units: list[Unit], *, desc: str = "collect XᵀX") -> tuple[dict[str, torch.Tensor], int]:
    """H[name] = Σ xᵀx over calibration tokens entering each unit (in, in), float64; and the token count."""
    modules = modules_by_name(workload.model, units)
    H: dict[str, torch.Tensor] = {}
    tokens = 0
    with hessian_hooks(modules, units, H) as new_batch, torch.no_grad():
        for batch in tqdm(workload.batches(), total=workload.n_batches(), desc=desc, leave=False):
            new_batch()
            (workload.run if hasattr(workload, "run") else workload.logits)(batch)
            tokens += batch.numel()
    return H, tokens


def streamed_output_error(workload: Workload, units: list[Unit], options: list[QuantSpec],
                          desc: str = "output_error (streamed)",
                          quantizer: Quantizer = DEFAULTS["rtn"]) -> tuple[torch.Tensor, int]:
    """The output_error table one decoder block at a time (alloc/models/stream.py): H of one block's units at a
    time, reduced to their cost rows before the next block; only the current boundary activations are kept."""
    stream = workload.stream(units)
    modules = modules_by_name(workload.model, units)
    where = [stream.block_of(u) for u in units]
    if any(b is None and u.kind == "embedding" for u, b in zip(units, where)):
        raise BitallocError("block streaming cannot measure embedding units: leave them out of --include")
    batches = list(workload.batches())
    n_tokens = sum(b.numel() for b in batches)
    cost = torch.zeros(len(units), len(options), dtype=torch.float64)
    row_cost: list[torch.Tensor | None] = [None] * len(units)

    def reduce(rows, H):
        for j in rows:
            r = unit_row_errors(unit_weight(modules, units[j]), H[units[j].name], options, quantizer) / n_tokens
            row_cost[j], cost[j] = r, r.sum(0)

    with torch.no_grad(), stream.resident():
        hidden = [stream.inputs(b) for b in batches]
        for i in tqdm(range(len(stream.blocks)), desc=desc, leave=False):
            rows, H = [j for j, b in enumerate(where) if b == i], {}
            with stream.block_on_device(i), hessian_hooks(modules, [units[j] for j in rows], H) as new_batch:
                for k, (h, extra) in enumerate(hidden):
                    new_batch()
                    hidden[k] = (stream.run_block(i, h, extra), extra)
                reduce(rows, H)
        rows, H = [j for j, b in enumerate(where) if b is None], {}
        with hessian_hooks(modules, [units[j] for j in rows], H) as new_batch:
            for (h, _), b in zip(hidden, batches):
                new_batch()
                stream.logits(h, b)
        reduce(rows, H)
    return cost, n_tokens, torch.cat(row_cost)


def row_errors(dW: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(out,) float64: ΔW_r H ΔW_rᵀ of each output row r (their sum is tr(ΔW H ΔWᵀ)); embeddings: H (out,)."""
    dW = dW.double()
    if H.dim() == 1:
        return H.double() * (dW * dW).sum(1)
    return ((dW @ H.double()) * dW).sum(1)


def unit_row_errors(W: torch.Tensor, H: torch.Tensor, options: list[QuantSpec],
                    quantizer: Quantizer = DEFAULTS["rtn"]) -> torch.Tensor:
    """(out, O) row errors of one unit under each option, ΔW by ``quantizer`` (GPTQ: on this H)."""
    W = W.detach().float()
    if H.dim() == 1:                                        # an embedding's H is a diagonal of counts
        return torch.stack([row_errors(quantizer.fake(W, spec) - W, H) for spec in options], dim=1)
    H = H.double()
    hessian = quantizer.prepare(H, options)                 # GPTQ's inverse factor, once for all the options
    return torch.stack([quantizer.error_rows(W, spec, H, hessian) for spec in options], dim=1)


@dataclass(frozen=True)
class OutputErrorProbe(Probe):
    name = "output_error"
    samples_meta = "n_tokens"
    gives_rows = True
    stream: str = "auto"                  # one decoder block at a time: auto, on, off
    quantizer: str = "rtn"                # whose ΔW the costs measure: rtn, or gptq (on each unit's own XᵀX)

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        refuse_experts(units, self.name)
        if streams(workload, units, self.stream):
            cost, n_tokens, row_cost = streamed_output_error(workload, units, options, quantizer=self.rounding)
            return self.table(units, options, cost, row_cost, n_tokens=n_tokens, streamed=True)
        H, n_tokens = collect_hessians(workload, units)
        modules = modules_by_name(workload.model, units)
        rows = [unit_row_errors(unit_weight(modules, u), H[u.name], options, self.rounding) / n_tokens
                for u in tqdm(units, desc="output_error costs", leave=False)]
        cost = torch.stack([r.sum(0) for r in rows])
        return self.table(units, options, cost, torch.cat(rows), n_tokens=n_tokens)
