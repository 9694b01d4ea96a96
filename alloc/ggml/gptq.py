"""GPTQ on llama.cpp's grids: the columns of a weight are rounded in order of decreasing input energy, each
column's error spread over the columns not yet rounded through the inverse Hessian (as alloc/quantize.py's
``gptq``), onto the ggml type's own grid.

The grid is fixed beforehand ("static groups", as act-order GPTQ fixes its groups): every sub-block's scale
and min, and the super-block integers behind them, come from our importance-weighted search on the original
weights (ggml/types.py, weighted by H's diagonal). Only the codes then follow GPTQ's sweep, so the result is
a GgmlQuantized the GGUF layout stores as it is.
"""
from __future__ import annotations

import torch

from ..gptq_sweep import damped, sweep
from .types import GgmlQuantized, GgmlType, quantize


def gptq_ggml(W: torch.Tensor, H: torch.Tensor, t: GgmlType, *, damp: float = 0.01,
              block_size: int = 128) -> GgmlQuantized:
    """``W`` (out, in) in ggml type ``t`` by GPTQ with act order on ``t``'s grid; ``H`` = XᵀX (in, in)."""
    out_f, in_f = W.shape
    W, H, h = damped(W, H, damp)
    grid = quantize(W, t, h)                                        # the static grid, from the original weights
    sub_of = torch.arange(in_f, device=W.device) // t.sub
    S, M = grid.S[:, sub_of], grid.M[:, sub_of]                     # (out, in): each column's scale and min
    safe = torch.where(S == 0, torch.ones_like(S), S)
    maxq = 2 ** t.bits - 1

    perm = torch.argsort(h, descending=True, stable=True)
    W, H, S, M, safe = W[:, perm], H[perm][:, perm], S[:, perm], M[:, perm], safe[:, perm]
    u = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)

    def round_col(col, W1, i):
        w = W1[:, i]
        if t.affine:
            code = torch.round((w + M[:, col]) / safe[:, col]).clamp(0, maxq)
            q = S[:, col] * code - M[:, col]
        else:
            code = (torch.round(w / safe[:, col]) + t.offset).clamp(0, maxq)
            q = S[:, col] * (code - t.offset)
        u[:, col] = torch.where(S[:, col] == 0, torch.full_like(code, t.offset), code).to(torch.uint8)
        return q
    sweep(W, H, block_size, round_col)
    codes = torch.empty_like(u)
    codes[:, perm] = u
    return GgmlQuantized(t, codes, grid.S, grid.M, grid.d, grid.dmin, grid.sc, grid.m)
