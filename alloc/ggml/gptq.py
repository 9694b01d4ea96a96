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

from ..gptq_sweep import prepare, start, sweep
from .types import GgmlQuantized, GgmlType, quantize


def gptq_ggml(W: torch.Tensor, H: torch.Tensor, t: GgmlType, *, damp: float = 0.01,
              block_size: int = 128) -> GgmlQuantized:
    """``W`` (out, in) in ggml type ``t`` by GPTQ with act order on ``t``'s grid; ``H`` = XᵀX (in, in)."""
    hs = prepare(H, damp, act_order=True, device=W.device)
    W, Wt = start(W, hs)
    grid = quantize(W, t, hs.h)                                     # the static grid, from the original weights
    sub_of = hs.perm // t.sub                                       # each swept column's sub-block
    S, M = grid.S.T[sub_of], grid.M.T[sub_of]                       # (in, out): each swept column's scale and min
    safe = torch.where(S == 0, torch.ones_like(S), S)
    maxq = 2 ** t.bits - 1
    u = torch.zeros(Wt.shape, dtype=torch.uint8, device=W.device)   # codes, a row per swept column

    def round_col(k, w):
        if t.affine:
            code = torch.round((w + M[k]) / safe[k]).clamp(0, maxq)
            q = S[k] * code - M[k]
        else:
            code = (torch.round(w / safe[k]) + t.offset).clamp(0, maxq)
            q = S[k] * (code - t.offset)
        u[k] = torch.where(S[k] == 0, torch.full_like(code, t.offset), code).to(torch.uint8)
        return q
    sweep(Wt, hs.Hinv, block_size, round_col)
    codes = torch.empty(W.shape, dtype=torch.uint8, device=W.device)
    codes[:, hs.perm] = u.T
    return GgmlQuantized(t, codes, grid.S, grid.M, grid.d, grid.dmin, grid.sc, grid.m)
