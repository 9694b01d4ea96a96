"""GPTQ's column sweep (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1), written once: our grids (alloc/quantize.py) and llama.cpp's K-quant
grids (alloc/ggml/gptq.py) both round through it.

    prepare(H, damp, act_order)          GPTQ's view of one XᵀX: damped diagonal, sweep order, inverse factor
    start(W, hessian)                    float32 W with dead inputs zeroed, and its columns as rows in sweep order
    sweep(Wt, Hinv, block_size, round)   round each column, spread its error over the columns after it
    error_rows(dW, hessian, losses)      (ΔW H ΔWᵀ)_ii of each row on the undamped H, from the sweep's losses

``prepare`` is the part every width of a layer shares (two Cholesky factorizations of an in × in matrix):
the probes that price a layer at several widths compute it once (``Quantizer.prepare``).

The sweep runs on Wᵀ: each column of W is a contiguous row there, so the rank-1 update after each column
is one ``addr_`` on contiguous memory (3-4× faster on a CPU than the strided column update of W itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hessian:
    """One layer's XᵀX as GPTQ uses it, whatever width the layer is rounded to."""
    h: torch.Tensor           # (in,) the damped diagonal: each column's importance (original column order)
    dead: torch.Tensor        # (in,) bool: inputs that never fire (H_jj = 0), zeroed in W
    perm: torch.Tensor        # (in,) the sweep order: by decreasing h with act order, else 0..in-1
    Hinv: torch.Tensor        # (in, in) upper Cholesky factor of H⁻¹, rows and columns in sweep order
    lam: float                # the damping added to every diagonal entry (dead inputs' are 1 + lam)


def prepare(H: torch.Tensor, damp: float, act_order: bool, device=None) -> Hessian:
    """``H`` (in, in) in float32 with dead inputs set to 1 on the diagonal and ``damp`` × the mean diagonal
    added to it; its sweep order and the inverse's upper Cholesky factor in that order."""
    H = H.detach().to(device if device is not None else H.device).float().clone()
    n = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    lam = damp * float(torch.diag(H).mean())
    H.diagonal().add_(lam)
    h = torch.diag(H).clone()
    perm = torch.argsort(h, descending=True, stable=True) if act_order else torch.arange(n, device=H.device)
    H = H[perm][:, perm]
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return Hessian(h, dead, perm, Hinv, lam)


def start(W: torch.Tensor, hessian: Hessian) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, Wt): float32 ``W`` (out, in) with the dead inputs zeroed, and its columns as rows in sweep order
    (in, out), the copy the sweep rounds in place."""
    W = W.detach().to(hessian.h.device).float()
    W = W.masked_fill(hessian.dead[None, :], 0)
    return W, W.T[hessian.perm].contiguous()


def sweep(Wt: torch.Tensor, Hinv: torch.Tensor, block_size: int, round_col,
          losses: torch.Tensor | None = None) -> None:
    """GPTQ's column sweep, in place on ``Wt`` (in, out): row k is the k-th column of W in sweep order, and
    ``Hinv`` is in that order too. ``round_col(k, w)`` rounds that column ``w`` (out,), error-updated, and
    returns it dequantized; its error is spread over the columns not yet rounded through the inverse
    Hessian, within a block of ``block_size`` columns one column at a time, beyond it once per block.

    ``losses`` (out,) float64 gains Σ_k err_k² per output row, err_k = (w_k − q_k) / Hinv_kk. That is the
    rounding's whole quadratic error on the damped H: ΔW = −E·Hinv with Hinv H Hinvᵀ = I, so ΔW H ΔWᵀ = E Eᵀ
    (GPTQ's "Losses"; ``error_rows`` takes the damping back out)."""
    in_f = Wt.shape[0]
    Err = torch.empty((block_size, Wt.shape[1]), dtype=Wt.dtype, device=Wt.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        for k in range(i1, i2):
            w = Wt[k]
            err = Err[k - i1]
            torch.sub(w, round_col(k, w), out=err)
            err /= Hinv[k, k]
            Wt[k:i2].addr_(Hinv[k, k:i2], err, alpha=-1)
        if losses is not None:
            losses += Err[:i2 - i1].square().sum(0, dtype=torch.float64)
        if i2 < in_f:
            Wt[i2:].addmm_(Hinv[i1:i2, i2:].T, Err[:i2 - i1], alpha=-1)


def error_rows(dW: torch.Tensor, hessian: Hessian, losses: torch.Tensor) -> torch.Tensor:
    """(out,) float64 (ΔW H ΔWᵀ)_ii on the undamped ``H`` from the sweep's ``losses`` (the same form on the
    damped one): less the damping, lam·‖ΔW_i‖², and the dead inputs' 1 (H's rows there are zero, so ΔW
    there adds nothing). ``dW`` (out, in): the rounded weight less the starting one, dead inputs zeroed."""
    sq = dW.square()
    dead = sq[:, hessian.dead].sum(1, dtype=torch.float64) if bool(hessian.dead.any()) else 0
    return (losses - hessian.lam * sq.sum(1, dtype=torch.float64) - dead).clamp_(min=0)
