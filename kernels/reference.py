"""The pure-torch twin of the Triton kernels: unpack, dequantize, matmul.

It computes exactly what a fake-quantized model computes (``W_hat = (q - zero) * scale`` in float32, cast to
the activation dtype, then ``x @ W_hat.T``), so a packed model on the CPU reproduces the fake-quantized
perplexity bit for bit. The Triton kernels are checked against it.
"""
from __future__ import annotations

import torch

from .pack import unpack_last_dim, unpack_weight


def unpack_zeros(qzeros: torch.Tensor | None, bits: int, n_groups: int, out_features: int) -> torch.Tensor:
    """qzeros (G, ceil(N/32)*bits) -> (G, N) int32; symmetric (None) -> the constant 2**(bits-1)."""
    if qzeros is None:
        return torch.full((n_groups, out_features), 2 ** (bits - 1), dtype=torch.int32)
    return unpack_last_dim(qzeros, bits, out_features)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int) -> torch.Tensor:
    """Packed tensors -> float32 weight (N out, K in)."""
    n_groups, out_features = scales.shape
    codes = unpack_weight(qweight, bits, in_features)                       # (N, K)
    zeros = unpack_zeros(qzeros, bits, n_groups, out_features).to(codes.device)
    g = in_features if group_size == -1 else group_size
    zero = zeros.t().repeat_interleave(g, dim=1)[:, :in_features]
    scale = scales.t().float().repeat_interleave(g, dim=1)[:, :in_features]
    return (codes - zero).float() * scale


def qmm_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
                  bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """x (..., K) @ dequantized W (N, K).T in x's dtype."""
    W = dequantize_packed(qweight, scales, qzeros, bits, group_size, in_features)
    return x @ W.to(x.dtype).t()
