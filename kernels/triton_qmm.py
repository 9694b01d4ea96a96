"""Triton kernels: y = x @ dequant(W).T with the dequantization fused in registers.

Two kernels read the planar layout of kernels/pack.py (see its docstring for the diagram):

* ``_gemv_kernel`` (one activation row, M = 1). It never reassembles codes. Because
  ``code = Σ_p plane_p << shift_p`` and the product is linear, each plane is dotted with x on its own: a
  plane word holding values ``k, k+PER, ...`` (PER = 32 / plane width) is loaded once, and for each of its
  PER slots the kernel shifts, masks and multiplies by the matching activation. Per group:
  ``y += scale * (Σ_k x_k q_k - zero * Σ_k x_k)``, so zeros and scales cost one FMA per output per group.
* ``_gemm_kernel`` (2 <= M <= 64). It decodes a (BLOCK_K, BLOCK_N) tile of codes (words re-read by every
  slot hit the L1 cache), forms ``q - zero`` as exact small integers in the activation dtype, runs
  ``tl.dot`` on the tensor cores with fp32 accumulation, and scales the tile's partial sum by the group's
  scale. A K tile never crosses a group (the autotune pruner keeps BLOCK_K dividing the group size).

The decode-tile kernels (GEMV "decode", GEMM, and the mixed-width kernels of triton_mixed.py) turn codes into
floats by the exponent trick (``_code_float``: OR the code into the mantissa of 2**23, reinterpret, one add
removes the offset and the zero point) instead of an int→float conversion per weight; the plane GEMV keeps
the conversion (its products would lose precision against a 2**23 offset). Not yet timed on a GPU.

Both split K across programs when there are too few output tiles to fill the GPU (fp32 atomics then, into
a zeroed buffer). Triton is imported lazily and nothing touches the GPU at import time. Under
``TRITON_INTERPRET=1`` (CPU, numpy) the kernels run with one small fixed configuration, for tests.
"""
from __future__ import annotations

import functools
import os

import torch

from .pack import PLANES, check_bits


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernels() -> dict:
    from . import _triton_kernels
    return _triton_kernels.KERNELS


def _split_k(tiles: int, K: int, device: torch.device) -> int:
    """How many programs share one output tile's K range. Measured on an H100 (examples/bench_kernels.py
    --explore): the kernels are bound by decode arithmetic, and splitting K until there are ~16 programs per
    multiprocessor was fastest at every shape tried (split 16 beat 4 and 1 on 4096..28672-wide layers)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = -(-16 * sms // tiles)
    split = 1 << max(0, (want - 1).bit_length())
    return max(1, min(split, 16, K // 256))


def qmm_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor | None,
               bits: int, group_size: int, in_features: int, *, config: dict | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16 @ dequant(W).T -> (..., N) in x's dtype.

    ``config`` fixes the launch (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``, ``num_warps``, ``BLOCK_M``) instead of
    autotuning; under TRITON_INTERPRET=1 a small fixed config is the default. ``out``: an (M, N) buffer in
    x's dtype to write into (tests poison it to check that every element is written)."""
    check_bits(bits)
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernels take fp16 or bf16 activations, got {x.dtype}: cast the model with "
                        ".half() or .bfloat16()")
    K = in_features
    N = scales.shape[1]
    planes = PLANES[bits]
    W0, W1 = planes[0], (planes[1] if len(planes) > 1 else 0)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    symmetric = qzeros is None
    qz = qweight if symmetric else qzeros             # a valid pointer the symmetric path never reads
    n_zero_words = 0 if symmetric else qzeros.shape[1]
    group = (1 << 30) if group_size == -1 else group_size
    ks = _kernels()
    fixed = dict(config or {})
    if interpreting() and not {"BLOCK_N", "BLOCK_K"} & fixed.keys():
        fixed.update(BLOCK_N=32, BLOCK_K=32)
    # launch choices (not autotuned): the kernel for this M, the row block, the K split
    mode = fixed.pop("MODE", None) or ("plane" if M == 1 else "dot")
    if mode not in ("plane", "decode", "dot"):
        raise ValueError(f"unknown kernel MODE {mode!r}: plane, decode (M = 1) or dot")
    gemv = mode != "dot"
    if gemv and M != 1:
        raise ValueError(f"the {mode} (GEMV) kernel takes one activation row: use MODE='dot' for M > 1")
    block_m = fixed.pop("BLOCK_M", None) or min(64, max(16, triton_next_pow2(M)))
    tiles = -(-N // fixed.get("BLOCK_N", 128)) * (1 if gemv else -(-M // block_m))
    split = fixed.pop("SPLIT_K", None) or _split_k(tiles, K, x.device)

    def launch(out):
        meta = {"BITS": bits, "W0": W0, "W1": W1, "SYMMETRIC": symmetric, "SPLIT_K": split}
        if gemv:
            args = (x2, qweight, scales, qz, out, N, K, group, n_zero_words)
            grid = lambda m: (-(-N // m["BLOCK_N"]), split)  # noqa: E731
            kern = ks[mode][0 if fixed else 1]
        else:
            args = (x2, qweight, scales, qz, out, M, N, K, x2.stride(0), out.stride(0), group, n_zero_words)
            meta["BLOCK_M"] = block_m
            if interpreting() and x.dtype == torch.bfloat16:
                meta["DOT_F32"] = True
            grid = lambda m: (-(-N // m["BLOCK_N"]), split, -(-M // block_m))  # noqa: E731
            kern = ks["dot"][0 if fixed else 1]
        kern[grid](*args, **meta, **fixed)

    if out is not None and (out.shape != (M, N) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous ({M}, {N}) {x.dtype} tensor")
    if split == 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
        launch(out)
        return out.view(*lead, N)
    result = out
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    tuner = ks[mode][1]
    cached = len(getattr(tuner, "cache", {}))
    launch(out)
    if not fixed and len(getattr(tuner, "cache", {})) != cached:
        # this call autotuned: the kernel ran many times into the same buffer, so run it once more
        out.zero_()
        launch(out)
    if result is not None:
        return result.copy_(out).view(*lead, N)
    return out.to(x.dtype).view(*lead, N)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
