"""One Triton launch per mixed-width layer: y = x @ dequant(W).T for a MixedQuantLinear, every segment (one
per width, at most four) in the same grid (kernels/_triton_mixed_kernels.py).

Each segment decodes exactly as a QuantLinear of its width does (the decode-tile GEMV for M = 1, the
tensor-core GEMM for 2 ≤ M ≤ 64, kernels/triton_qmm.py), and writes its outputs to their layer rows through
the stored row order. Under ``TRITON_INTERPRET=1`` a small fixed configuration runs on the CPU, for tests.
Launch configurations are fixed (not autotuned) and have not been timed on a GPU yet.
"""
from __future__ import annotations

import functools

import torch

from .pack import PLANES
from .triton_qmm import _split_k, interpreting, triton_next_pow2


@functools.cache
def _kernels():
    from . import _triton_mixed_kernels
    return _triton_mixed_kernels


def _segment_args(layer, block_n: int) -> tuple[list, dict]:
    """The 4 × 7 runtime integers and the 4 × 3 width constants of the layer's segments (absent = zeros)."""
    ints, meta = [], {}
    tiles = 0
    for k in range(4):
        if k < len(layer.layout):
            seg = layer.layout[k]
            tiles += -(-seg["n"] // block_n)
            planes = PLANES[seg["bits"]]
            ints += [seg["n"], seg["row0"], seg["qw"], seg["s"], seg["qz"], seg["zero_words"], tiles]
            meta.update({f"B{k}": seg["bits"], f"A{k}": planes[0], f"C{k}": planes[1] if len(planes) > 1 else 0})
        else:
            ints += [0, 0, 0, 0, 0, 0, tiles]
            meta.update({f"B{k}": 0, f"A{k}": 0, f"C{k}": 0})
    return ints, meta


def qmm_mixed_triton(x: torch.Tensor, layer, *, config: dict | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16 @ dequant(layer's W).T -> (..., N) in x's dtype, one launch.

    ``config``: BLOCK_N, BLOCK_K, BLOCK_M, SPLIT_K, num_warps to fix; ``out``: an (M, N) buffer to write."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take fp16 or bf16 activations, got {x.dtype}")
    K, N = layer.in_features, layer.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    group = (1 << 30) if layer.group_size == -1 else layer.group_size
    fixed = dict(config or {})
    if interpreting():
        fixed.setdefault("BLOCK_N", 32)
        fixed.setdefault("BLOCK_K", 32)
    block_n = fixed.pop("BLOCK_N", 64)
    block_k = fixed.pop("BLOCK_K", 64 if group % 64 == 0 else 32)
    block_m = fixed.pop("BLOCK_M", None) or min(64, max(16, triton_next_pow2(M)))
    ints, meta = _segment_args(layer, block_n)
    tiles = ints[-1]
    split = fixed.pop("SPLIT_K", None) or _split_k(tiles * (1 if M == 1 else -(-M // block_m)), K, x.device)
    qz = layer.qzeros if layer.qzeros is not None else layer.qweight     # never read when symmetric
    order = layer.order.to(x.device)
    meta.update(SYMMETRIC=layer.symmetric, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, **fixed)
    if out is not None and (out.shape != (M, N) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({M}, {N}) {x.dtype} tensor")
    target = (out if out is not None else torch.empty(M, N, dtype=x.dtype, device=x.device)) if split == 1 \
        else torch.zeros(M, N, dtype=torch.float32, device=x.device)
    ks = _kernels()
    if M == 1:
        ks.mixed_gemv[(tiles, split)](x2, layer.qweight, layer.scales, qz, target, order, K, group, *ints, **meta)
    else:
        dot_f32 = interpreting() and x.dtype == torch.bfloat16
        ks.mixed_gemm[(tiles, split, -(-M // block_m))](x2, layer.qweight, layer.scales, qz, target, order, M, K,
                                                        x2.stride(0), target.stride(0), group, *ints,
                                                        BLOCK_M=block_m, DOT_F32=dot_f32, **meta)
    if split == 1:
        return target.view(*lead, N)
    if out is not None:
        return out.copy_(target).view(*lead, N)
    return target.to(x.dtype).view(*lead, N)
