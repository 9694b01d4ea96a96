"""The Triton kernels themselves (see triton_qmm.py for what they compute and how they are launched).

Imported only by ``triton_qmm._kernels()``, so ``import bitalloc`` never needs Triton. Importing Triton does
not touch the GPU; compilation and autotuning happen at the first launch.
"""
import triton
import triton.language as tl



@triton.jit
def _decode_along(ptr, offs, mask, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
    """Codes at positions ``offs`` of one packed row (used for zero points, packed along N)."""
    blk = offs // 32
    i = offs % 32
    PER0: tl.constexpr = 32 // W0
    w = tl.load(ptr + blk * BITS + i // PER0, mask=mask, other=0)
    v = (w >> ((i % PER0) * W0)) & ((1 << W0) - 1)
    if W1 > 0:
        PER1: tl.constexpr = 32 // W1
        w1 = tl.load(ptr + blk * BITS + W0 + i // PER1, mask=mask, other=0)
        v = v | (((w1 >> ((i % PER1) * W1)) & ((1 << W1) - 1)) << W0)
    return v


@triton.jit
def _group_scale_zero(s_ptr, qz_ptr, g, N, n_zero_words, offs_n, nmask, BITS: tl.constexpr,
                      W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr):
    s = tl.load(s_ptr + g * N + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if SYMMETRIC:
        z = tl.full(s.shape, 1 << (BITS - 1), tl.int32)
    else:
        z = _decode_along(qz_ptr + g * n_zero_words, offs_n, nmask, BITS, W0, W1)
    return s, z


@triton.jit
def _plane_dot(x_ptr, qw_ptr, k0, K, N, offs_n, nmask, BITS: tl.constexpr, START: tl.constexpr,
               W: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Σ_k x_k * plane(k) over one K tile, for one plane of width W whose words start at START."""
    PER: tl.constexpr = 32 // W
    R: tl.constexpr = BLOCK_K // 32 * W
    r = tl.arange(0, R)
    blk = k0 // 32 + r // W
    j = r % W
    kbase = blk * 32 + j * PER                               # k of slot 0 of this word
    words = tl.load(qw_ptr + (blk * BITS + START + j)[:, None] * N + offs_n[None, :],
                    mask=(kbase < K)[:, None] & nmask[None, :], other=0)
    t = tl.zeros((R, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(PER):
        xi = tl.load(x_ptr + kbase + i, mask=(kbase + i) < K, other=0.0).to(tl.float32)
        t += xi[:, None] * ((words >> (i * W)) & ((1 << W) - 1)).to(tl.float32)
    return tl.sum(t, axis=0)


@triton.jit
def _k_range(pid_k, K, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """[start, end) of the K range program ``pid_k`` reduces when K is split SPLIT_K ways."""
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_span
    return k_start, tl.minimum(k_start + k_span, K)


@triton.jit
def _write(ptrs, acc, mask, SPLIT_K: tl.constexpr):
    """Store the fp32 accumulator in the output's dtype, or add it atomically when K is split."""
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, N, K, group_size, n_zero_words,
                 BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    k_start, k_end = _k_range(pid_k, K, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        s, z = _group_scale_zero(s_ptr, qz_ptr, k0 // group_size, N, n_zero_words, offs_n, nmask,
                                 BITS, W0, W1, SYMMETRIC)
        dot = _plane_dot(x_ptr, qw_ptr, k0, K, N, offs_n, nmask, BITS, 0, W0, BLOCK_K, BLOCK_N)
        if W1 > 0:
            dot += _plane_dot(x_ptr, qw_ptr, k0, K, N, offs_n, nmask, BITS, W0, W1, BLOCK_K,
                              BLOCK_N) * (1 << W0)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xsum = tl.sum(tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32), axis=0)
        acc += s * (dot - z.to(tl.float32) * xsum)
    _write(out_ptr + offs_n, acc, nmask, SPLIT_K)


@triton.jit
def _decode_tile(qw_ptr, offs_k, offs_n, N, wmask, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr):
    """A (BLOCK_K, BLOCK_N) tile of codes; the words shared by neighbouring k are re-read from L1."""
    PER0: tl.constexpr = 32 // W0
    blk = offs_k // 32
    i = offs_k % 32
    w = tl.load(qw_ptr + (blk * BITS + i // PER0)[:, None] * N + offs_n[None, :], mask=wmask, other=0)
    q = (w >> ((i % PER0) * W0)[:, None]) & ((1 << W0) - 1)
    if W1 > 0:
        PER1: tl.constexpr = 32 // W1
        w1 = tl.load(qw_ptr + (blk * BITS + W0 + i // PER1)[:, None] * N + offs_n[None, :], mask=wmask, other=0)
        q = q | (((w1 >> ((i % PER1) * W1)[:, None]) & ((1 << W1) - 1)) << W0)
    return q


@triton.jit
def _code_float(q, offset):
    """``q − offset`` as float32 for small non-negative integer codes q, by the exponent trick: OR q into the
    mantissa of 2**23 (bit pattern 0x4B000000), reinterpret as float (= 2**23 + q, exact), subtract
    2**23 + offset in one add. Replaces an int→float conversion per weight (slow on GPUs) by an OR and an add."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _decode_gemv_acc(x_ptr, qw_ptr, s_ptr, qz_ptr, offs_n, nmask, N, K, k_start, k_end, group_size,
                     n_zero_words, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                     SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k x_k dequant(W)[n, k] over [k_start, k_end) for the outputs ``offs_n``: decode a code tile,
    multiply by x, reduce over K (no tensor cores). Shared with the mixed-width kernels."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        q = _decode_tile(qw_ptr, offs_k, offs_n, N, kmask[:, None] & nmask[None, :], BITS, W0, W1)
        s, z = _group_scale_zero(s_ptr, qz_ptr, k0 // group_size, N, n_zero_words, offs_n, nmask,
                                 BITS, W0, W1, SYMMETRIC)
        dot = tl.sum(x[:, None] * _code_float(q, 0.0), axis=0)
        acc += s * (dot - z.to(tl.float32) * tl.sum(x, axis=0))
    return acc


@triton.jit
def _gemv_decode_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, N, K, group_size, n_zero_words,
                        BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr, SYMMETRIC: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """GEMV variant: decode a code tile, multiply by x, reduce over K (no tensor cores)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    k_start, k_end = _k_range(pid_k, K, SPLIT_K, BLOCK_K)
    acc = _decode_gemv_acc(x_ptr, qw_ptr, s_ptr, qz_ptr, offs_n, nmask, N, K, k_start, k_end, group_size,
                           n_zero_words, BITS, W0, W1, SYMMETRIC, BLOCK_N, BLOCK_K)
    _write(out_ptr + offs_n, acc, nmask, SPLIT_K)


@triton.jit
def _dot_gemm_acc(x_ptr, qw_ptr, s_ptr, qz_ptr, offs_m, mmask, offs_n, nmask, N, K, k_start, k_end, stride_xm,
                  group_size, n_zero_words, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                  SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_F32: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) partial product over [k_start, k_end): tensor-core dots of x with decoded
    (q − zero) tiles, scaled per group. Shared with the mixed-width kernels."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        q = _decode_tile(qw_ptr, offs_k, offs_n, N, kmask[:, None] & nmask[None, :], BITS, W0, W1)
        s, z = _group_scale_zero(s_ptr, qz_ptr, k0 // group_size, N, n_zero_words, offs_n, nmask,
                                 BITS, W0, W1, SYMMETRIC)
        wq = _code_float(q, z[None, :].to(tl.float32))
        if DOT_F32:     # Triton's CPU interpreter gets bf16 tl.dot wrong (checked with Triton 3.9): use fp32 there
            acc += tl.dot(x.to(tl.float32), wq) * s[None, :]
        else:           # |q - z| <= 255: exact in fp16 and bf16
            acc += tl.dot(x, wq.to(x.dtype)) * s[None, :]
    return acc


@triton.jit
def _gemm_kernel(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, M, N, K, stride_xm, stride_om, group_size,
                 n_zero_words, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                 SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    k_start, k_end = _k_range(pid_k, K, SPLIT_K, BLOCK_K)
    acc = _dot_gemm_acc(x_ptr, qw_ptr, s_ptr, qz_ptr, offs_m, mmask, offs_n, nmask, N, K, k_start, k_end,
                        stride_xm, group_size, n_zero_words, BITS, W0, W1, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K,
                        DOT_F32)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    omask = mmask[:, None] & nmask[None, :]
    _write(out, acc, omask, SPLIT_K)


def prune(configs, named_args, **kwargs):
    group = named_args["group_size"]
    K = named_args["K"]
    kept = [c for c in configs if group % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_K"] <= max(K, 32)]
    return kept or [c for c in configs if c.kwargs["BLOCK_K"] == 32]


cfg = triton.Config
gemv_configs = [cfg({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(64, 128, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3), (256, 128, 8, 2),
                                     (256, 64, 8, 3), (64, 64, 2, 3), (32, 128, 2, 2), (128, 32, 4, 4)]]
gemm_configs = [cfg({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                for bn, bk, w, s in [(64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2),
                                     (256, 64, 8, 3), (32, 128, 4, 3), (64, 32, 4, 4)]]
prune_by = {"early_config_prune": prune}
gemv = triton.autotune(gemv_configs, key=["N", "K", "group_size", "BITS", "SYMMETRIC", "SPLIT_K"],
                       prune_configs_by=prune_by)(_gemv_kernel)
gemm = triton.autotune(gemm_configs, key=["M", "N", "K", "group_size", "BITS", "SYMMETRIC", "SPLIT_K",
                                          "BLOCK_M"], prune_configs_by=prune_by)(_gemm_kernel)
gemv_decode = triton.autotune(gemv_configs, key=["N", "K", "group_size", "BITS", "SYMMETRIC", "SPLIT_K"],
                              prune_configs_by=prune_by)(_gemv_decode_kernel)
KERNELS = {"plane": (_gemv_kernel, gemv), "decode": (_gemv_decode_kernel, gemv_decode), "dot": (_gemm_kernel, gemm)}
