"""The bytes of each ggml type's blocks, as llama.cpp (and the ``gguf`` package's decoder) read them.

``pack(q)`` turns a GgmlQuantized (ggml/types.py) into a uint8 array (rows, blocks per row × block bytes),
the tensor data of a GGUF file. Element indices below are within one block; "u" is the unsigned code.

    Q4_0  d | qs[16]: qs[k] = u[k] | u[k+16] << 4                                  (x = d (u - 8))
    Q4_1  d | m | qs[16]                                                           (x = d u + m)
    Q5_0  d | qh (32 bits: bit k = u[k] >> 4) | qs[16] of the low nibbles          (x = d (u - 16))
    Q5_1  d | m | qh | qs
    Q8_0  d | int8 q[32] = u - 128
    Q2_K  scales[16] = sc | m << 4 | qs[64] | d | dmin
    Q3_K  hmask[32] | qs[64] | scales[12] (6-bit sc + 32) | d
    Q4_K  d | dmin | scales[12] (6-bit sc and m of 8 sub-blocks) | qs[128]
    Q5_K  d | dmin | scales[12] | qh[32] | qs[128]
    Q6_K  ql[128] | qh[64] | scales[16] (int8) | d
"""
from __future__ import annotations

import numpy as np
import torch

from .types import GgmlQuantized


def pack(q: GgmlQuantized) -> np.ndarray:
    t = q.type
    rows, cols = q.u.shape
    nb = cols // t.block
    u = q.u.cpu().numpy().astype(np.uint8).reshape(rows * nb, t.block)
    d = _f16(q.d).reshape(rows * nb, 2)
    out = {"Q4_0": lambda: [d, _nibbles(u)],
           "Q4_1": lambda: [d, _f16(q.dmin).reshape(-1, 2), _nibbles(u)],
           "Q5_0": lambda: [d, _high_bits32(u), _nibbles(u & 0xF)],
           "Q5_1": lambda: [d, _f16(q.dmin).reshape(-1, 2), _high_bits32(u), _nibbles(u & 0xF)],
           "Q8_0": lambda: [d, (u.astype(np.int16) - 128).astype(np.int8).view(np.uint8)],
           }.get(t.name)
    if out is not None:
        blocks = np.concatenate(out(), axis=1)
    else:
        sc = q.sc.cpu().numpy().reshape(rows * nb, t.block // t.sub)
        m = q.m.cpu().numpy().reshape(rows * nb, t.block // t.sub)
        dmin = _f16(q.dmin).reshape(rows * nb, 2)
        blocks = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[t.name](u, sc, m, d, dmin)
    assert blocks.shape[1] == t.block_bytes, (t.name, blocks.shape)
    return np.ascontiguousarray(blocks.reshape(rows, nb * t.block_bytes))


def _f16(x: torch.Tensor) -> np.ndarray:
    return x.cpu().half().numpy().view(np.uint8)


def _nibbles(u: np.ndarray) -> np.ndarray:
    """Legacy 32-blocks: byte k holds weight k (low) and weight k + 16 (high)."""
    half = u.shape[1] // 2
    return (u[:, :half] & 0xF) | ((u[:, half:] & 0xF) << 4)


def _high_bits32(u: np.ndarray) -> np.ndarray:
    return np.packbits((u >> 4) & 1, axis=-1, bitorder="little")


def _crumbs(u: np.ndarray, n: int) -> np.ndarray:
    """2-bit fields of 256 weights into 64 bytes per half of 128 as Q2_K/Q3_K/Q6_K lay them: weight
    h*128 + s*32 + p goes to byte h*32 + p, bits 2s (``n``: weights per half, 128)."""
    b = u.reshape(-1, 2, 4, 32).astype(np.uint8) & 3
    return (b[:, :, 0] | b[:, :, 1] << 2 | b[:, :, 2] << 4 | b[:, :, 3] << 6).reshape(-1, 64)


def _bitplanes(bits: np.ndarray) -> np.ndarray:
    """One bit of each of 256 weights: weight j*32 + p goes to byte p, bit j (Q3_K's hmask, Q5_K's qh)."""
    b = bits.reshape(-1, 8, 32).astype(np.uint8) & 1
    return sum(b[:, j] << j for j in range(8)).astype(np.uint8)


def _k_nibbles(u: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K codes: weight (2i)*32 + k in the low nibble of byte i*32 + k, weight (2i+1)*32 + k high."""
    b = u.reshape(-1, 4, 2, 32).astype(np.uint8) & 0xF
    return (b[:, :, 0] | b[:, :, 1] << 4).reshape(-1, 128)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in 12 bytes (Q4_K, Q5_K)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (m[:, 0:4] & 0x3F) | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def _q2_k(u, sc, m, d, dmin):
    scales = (sc.astype(np.uint8) & 0xF) | (m.astype(np.uint8) << 4)
    return np.concatenate([scales, _crumbs(u, 128), d, dmin], axis=1)


def _q3_k(u, sc, m, d, dmin):
    s6 = (sc + 32).astype(np.uint8)                                 # signed 6-bit, stored with +32
    scales = np.zeros((u.shape[0], 12), dtype=np.uint8)
    for i in range(16):
        scales[:, i % 8] |= (s6[:, i] & 0xF) << (4 * (i // 8))
        scales[:, 8 + i % 4] |= ((s6[:, i] >> 4) & 3) << (2 * (i // 4))
    return np.concatenate([_bitplanes(u >> 2), _crumbs(u, 128), scales, d], axis=1)


def _q4_k(u, sc, m, d, dmin):
    return np.concatenate([d, dmin, _k_scales(sc, m), _k_nibbles(u)], axis=1)


def _q5_k(u, sc, m, d, dmin):
    return np.concatenate([d, dmin, _k_scales(sc, m), _bitplanes(u >> 4), _k_nibbles(u)], axis=1)


def _q6_k(u, sc, m, d, dmin):
    low = u.reshape(-1, 2, 2, 64).astype(np.uint8) & 0xF           # weight h*128 + t*64 + p
    ql = (low[:, :, 0] | low[:, :, 1] << 4).reshape(-1, 128)
    qh = _crumbs(u >> 4, 128)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d], axis=1)
