"""hessian_trace probe (HAWQ-V2/V3): per-layer trace of the loss Hessian by Hutchinson's estimator.

    Tr(H_l) ≈ mean_k  v_lᵀ (H v)_l ,   v ~ Rademacher over ALL layers at once

One probe vector per iteration is shared by every layer, so one Hessian-vector product (double backprop)
gives every layer's sample. Iterations cycle over the calibration windows and stop when the running mean
of every layer moved by less than ``tol`` (relative) in the last iteration, or at ``max_iters``.

    cost(l, spec) = Tr(H_l) / n_l · ‖Q_spec(W_l) − W_l‖²

Streamed (``stream="on"``, or ``auto`` for a model whose whole-model double backprop would not fit): the
Hessian-vector products need the whole graph, so one block at a time the probe uses a block-local estimate
instead, the trace of the empirical Fisher, Tr(H_l) ≈ Σ_k E[(∂loss/∂W_l,k)²] (the Gauss-Newton curvature
at a trained optimum), from the streamed fisher pass (sensitivity/streamed.py). Its table is keyed apart
from Hutchinson's (``stream`` is part of this probe's settings) and says ``estimator`` in its meta.

Negative estimates: a trained model's loss Hessian is not positive definite everywhere, and a noisy
Hutchinson mean can come out ≤ 0 for a flat layer. We clamp the trace at 1e-6 × the largest layer's trace
(a flat layer is cheap to quantize, never free) and report the raw estimates in ``meta["trace"]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.attention
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import fake_quantize
from ..units import Unit, unit_slice, unit_weight
from .base import (Probe, Workload, check_loss, check_trainable, grads_only_for, modules_by_name, streams,
                   unique_params)
from .table import SensitivityTable


def hutchinson_traces(loss_fn, params: list[torch.Tensor], batches: list[torch.Tensor], *, tol: float = 1e-2,
                      min_iters: int = 8, max_iters: int = 64, seed: int = 0, reduce=None):
    """Per-parameter Hessian traces of ``loss_fn(batch)``: (means, standard errors, iterations).

    ``reduce(products)``, given v ⊙ Hv per parameter, gives the per-unit samples instead (experts of one
    3-D parameter each take their slice)."""
    gen = torch.Generator().manual_seed(seed)
    samples: list[torch.Tensor] = []
    mean = None
    bar = tqdm(range(max_iters), desc="hutchinson", leave=False)
    for k in bar:
        loss = loss_fn(batches[k % len(batches)])
        check_loss(loss, f"calibration batch {k % len(batches)}")
        grads = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype).mul_(2).sub_(1) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs)
        products = [v * hv for v, hv in zip(vs, hvs)]
        samples.append(reduce(products) if reduce is not None else
                       torch.tensor([float(p.sum()) for p in products], dtype=torch.float64))
        new_mean = torch.stack(samples).mean(0)
        if mean is not None and k + 1 >= min_iters:
            change = ((new_mean - mean).abs() / new_mean.abs().clamp(min=1e-30)).max()
            bar.set_postfix(change=f"{float(change):.3g}")
            if change < tol:
                mean = new_mean
                break
        mean = new_mean
    s = torch.stack(samples)
    stderr = s.std(0, unbiased=True) / len(s) ** 0.5 if len(s) > 1 else torch.full_like(mean, float("inf"))
    return mean, stderr, len(samples)


def fisher_trace_costs(F: torch.Tensor, W: torch.Tensor, options: list[QuantSpec]) -> torch.Tensor:
    """(O,) block-local hessian_trace costs of one unit: Tr(F) / n · ‖Q(W) − W‖² under each option."""
    trace = float(F.double().sum()) / F.numel()
    Wf = W.detach().float()
    return torch.tensor([trace * float((fake_quantize(Wf, spec) - Wf).double().pow(2).sum()) for spec in options],
                        dtype=torch.float64)


@dataclass(frozen=True)
class HessianTraceProbe(Probe):
    name = "hessian_trace"
    needs_grad = True
    tol: float = 1e-2
    min_iters: int = 8
    max_iters: int = 64
    micro_batch: int = 1
    seed: int = 0
    stream: str = "auto"              # on: the block-local Fisher-trace estimate, one decoder block at a time
    same_numbers = ()                 # unlike the other probes, streaming changes the estimator: it is keyed

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        if streams(workload, units, self.stream):
            from .streamed import streamed_fisher_costs
            cost, steps = streamed_fisher_costs(workload, units, options, micro_batch=self.micro_batch,
                                                costs_fn=fisher_trace_costs)
            return self.table(units, options, cost, estimator="fisher trace (block-local)",
                              gradient_samples=steps, streamed=True)
        model = workload.model
        check_trainable(model, units)
        modules = modules_by_name(model, units)
        params, index = unique_params(model, units)

        def per_unit(products):
            return torch.tensor([float(unit_slice(products[k], u).double().sum()) for u, k in zip(units, index)],
                                dtype=torch.float64)
        tokens = torch.cat(list(workload.batches()))
        batches = [tokens[i:i + self.micro_batch] for i in range(0, len(tokens), self.micro_batch)]
        # fused attention kernels have no second derivative: use the math backend for the HVPs
        with grads_only_for(model, params), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            trace, stderr, iters = hutchinson_traces(workload.loss, params, batches, tol=self.tol,
                                                     min_iters=self.min_iters, max_iters=self.max_iters,
                                                     seed=self.seed, reduce=per_unit)
        used = trace.clamp(min=1e-6 * float(trace.abs().max()))
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        for i, unit in enumerate(units):
            W = unit_weight(modules, unit).detach().float()
            for j, spec in enumerate(options):
                cost[i, j] = float(used[i]) / unit.numel * float((fake_quantize(W, spec) - W).double().pow(2).sum())
        return self.table(units, options, cost, estimator="hutchinson", iterations=iters, trace=trace.tolist(),
                          trace_stderr=stderr.tolist(),
                          negative_traces=[u.name for u, t in zip(units, trace) if t <= 0])
