"""GPTQ's column sweep (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1), written once: our grids (alloc/quantize.py) and llama.cpp's K-quant
grids (alloc/ggml/gptq.py) both round through it.

    damped(W, H, damp)                   float32 copies, dead inputs zeroed, H's diagonal damped
    sweep(W, H, block_size, round_col)   round each column, spread its error over the columns after it
"""
from __future__ import annotations

import torch


def damped(W: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ's starting point: float32 copies of ``W`` and ``H`` with dead inputs (H_jj = 0) zeroed in W and
    set to 1 on H's diagonal, ``damp`` × the mean diagonal added to it, and that diagonal (column importance)."""
    W = W.detach().float().clone()
    H = H.detach().to(W.device).float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(W.shape[1], dtype=H.dtype, device=H.device)
    return W, H, torch.diag(H).clone()


def sweep(W: torch.Tensor, H: torch.Tensor, block_size: int, round_col) -> None:
    """GPTQ's column sweep, in place on ``W`` (out, in) whose columns are in sweep order (``H`` likewise):
    ``round_col(col, W1, i)`` rounds column ``col`` (``W1[:, i]`` of the current block, error-updated) and
    returns it dequantized; its error is spread over the columns not yet rounded through the inverse Hessian."""
    in_f = W.shape[1]
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)      # (in, in), upper
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            err = (w - round_col(i1 + i, W1, i)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
