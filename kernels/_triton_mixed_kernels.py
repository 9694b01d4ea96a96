"""The Triton kernels of mixed-width layers (see triton_mixed.py for what they compute and how they launch).

One launch covers every segment of a MixedQuantLinear: the output tiles of all segments are numbered one
after another (``T0`` tiles of segment 0, then segment 1's up to ``T1``, …); a program finds its segment by
comparing its tile number with those bounds and runs that segment's decode, specialised at compile time for
the segment's width. Results go straight to their layer rows through the row order (``order``), so no
gather follows. Imported only by ``triton_mixed._kernels()``.
"""
import triton
import triton.language as tl

from ._triton_kernels import _decode_gemv_acc, _dot_gemm_acc, _k_range, _write


@triton.jit
def _segment_gemv(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, order_ptr, tile, n, row0, K, k_start, k_end,
                  group_size, n_zero_words, BITS: tl.constexpr, W0: tl.constexpr, W1: tl.constexpr,
                  SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n
    acc = _decode_gemv_acc(x_ptr, qw_ptr, s_ptr, qz_ptr, offs_n, nmask, n, K, k_start, k_end, group_size,
                           n_zero_words, BITS, W0, W1, SYMMETRIC, BLOCK_N, BLOCK_K)
    rows = tl.load(order_ptr + row0 + offs_n, mask=nmask, other=0)
    _write(out_ptr + rows, acc, nmask, SPLIT_K)


@triton.jit
def _segment_gemm(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, order_ptr, tile, n, row0, M, K, k_start, k_end,
                  stride_xm, stride_om, group_size, n_zero_words, pid_m, BITS: tl.constexpr, W0: tl.constexpr,
                  W1: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < n
    acc = _dot_gemm_acc(x_ptr, qw_ptr, s_ptr, qz_ptr, offs_m, mmask, offs_n, nmask, n, K, k_start, k_end,
                        stride_xm, group_size, n_zero_words, BITS, W0, W1, SYMMETRIC, BLOCK_M, BLOCK_N, BLOCK_K,
                        DOT_F32)
    rows = tl.load(order_ptr + row0 + offs_n, mask=nmask, other=0)
    _write(out_ptr + offs_m[:, None] * stride_om + rows[None, :], acc, mmask[:, None] & nmask[None, :], SPLIT_K)


@triton.jit
def mixed_gemv(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, order_ptr, K, group_size,
               n0, r0, qw0, s0, qz0, zw0, t0, n1, r1, qw1, s1, qz1, zw1, t1,
               n2, r2, qw2, s2, qz2, zw2, t2, n3, r3, qw3, s3, qz3, zw3, t3,
               B0: tl.constexpr, A0: tl.constexpr, C0: tl.constexpr, B1: tl.constexpr, A1: tl.constexpr,
               C1: tl.constexpr, B2: tl.constexpr, A2: tl.constexpr, C2: tl.constexpr, B3: tl.constexpr,
               A3: tl.constexpr, C3: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """M = 1. Segment k: width Bk (planes Ak + Ck), nk rows from sorted row rk, tensors at qwk/sk/qzk of the
    flat buffers, zwk zero words per group, its tiles end at tk. Bk = 0: no such segment."""
    pid = tl.program_id(0)
    k_start, k_end = _k_range(tl.program_id(1), K, SPLIT_K, BLOCK_K)
    if pid < t0:
        _segment_gemv(x_ptr, qw_ptr + qw0, s_ptr + s0, qz_ptr + qz0, out_ptr, order_ptr, pid, n0, r0, K,
                      k_start, k_end, group_size, zw0, B0, A0, C0, SYMMETRIC, BLOCK_N, BLOCK_K, SPLIT_K)
    if B1 > 0:
        if (pid >= t0) & (pid < t1):
            _segment_gemv(x_ptr, qw_ptr + qw1, s_ptr + s1, qz_ptr + qz1, out_ptr, order_ptr, pid - t0, n1, r1, K,
                          k_start, k_end, group_size, zw1, B1, A1, C1, SYMMETRIC, BLOCK_N, BLOCK_K, SPLIT_K)
    if B2 > 0:
        if (pid >= t1) & (pid < t2):
            _segment_gemv(x_ptr, qw_ptr + qw2, s_ptr + s2, qz_ptr + qz2, out_ptr, order_ptr, pid - t1, n2, r2, K,
                          k_start, k_end, group_size, zw2, B2, A2, C2, SYMMETRIC, BLOCK_N, BLOCK_K, SPLIT_K)
    if B3 > 0:
        if (pid >= t2) & (pid < t3):
            _segment_gemv(x_ptr, qw_ptr + qw3, s_ptr + s3, qz_ptr + qz3, out_ptr, order_ptr, pid - t2, n3, r3, K,
                          k_start, k_end, group_size, zw3, B3, A3, C3, SYMMETRIC, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.jit
def mixed_gemm(x_ptr, qw_ptr, s_ptr, qz_ptr, out_ptr, order_ptr, M, K, stride_xm, stride_om, group_size,
               n0, r0, qw0, s0, qz0, zw0, t0, n1, r1, qw1, s1, qz1, zw1, t1,
               n2, r2, qw2, s2, qz2, zw2, t2, n3, r3, qw3, s3, qz3, zw3, t3,
               B0: tl.constexpr, A0: tl.constexpr, C0: tl.constexpr, B1: tl.constexpr, A1: tl.constexpr,
               C1: tl.constexpr, B2: tl.constexpr, A2: tl.constexpr, C2: tl.constexpr, B3: tl.constexpr,
               A3: tl.constexpr, C3: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, DOT_F32: tl.constexpr):
    """2 ≤ M ≤ 64: as mixed_gemv, with tensor-core dots on decoded (q − zero) tiles."""
    pid = tl.program_id(0)
    pid_m = tl.program_id(2)
    k_start, k_end = _k_range(tl.program_id(1), K, SPLIT_K, BLOCK_K)
    if pid < t0:
        _segment_gemm(x_ptr, qw_ptr + qw0, s_ptr + s0, qz_ptr + qz0, out_ptr, order_ptr, pid, n0, r0, M, K,
                      k_start, k_end, stride_xm, stride_om, group_size, zw0, pid_m, B0, A0, C0, SYMMETRIC,
                      BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, DOT_F32)
    if B1 > 0:
        if (pid >= t0) & (pid < t1):
            _segment_gemm(x_ptr, qw_ptr + qw1, s_ptr + s1, qz_ptr + qz1, out_ptr, order_ptr, pid - t0, n1, r1, M,
                          K, k_start, k_end, stride_xm, stride_om, group_size, zw1, pid_m, B1, A1, C1, SYMMETRIC,
                          BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, DOT_F32)
    if B2 > 0:
        if (pid >= t1) & (pid < t2):
            _segment_gemm(x_ptr, qw_ptr + qw2, s_ptr + s2, qz_ptr + qz2, out_ptr, order_ptr, pid - t1, n2, r2, M,
                          K, k_start, k_end, stride_xm, stride_om, group_size, zw2, pid_m, B2, A2, C2, SYMMETRIC,
                          BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, DOT_F32)
    if B3 > 0:
        if (pid >= t2) & (pid < t3):
            _segment_gemm(x_ptr, qw_ptr + qw3, s_ptr + s3, qz_ptr + qz3, out_ptr, order_ptr, pid - t2, n3, r3, M,
                          K, k_start, k_end, stride_xm, stride_om, group_size, zw3, pid_m, B3, A3, C3, SYMMETRIC,
                          BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, DOT_F32)
