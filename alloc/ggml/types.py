"""llama.cpp's weight types (ggml) and our own quantizers for them.

Every type rounds blocks of ``block`` weights along a row (the input dimension) into unsigned codes u of
``bits`` bits; each sub-block of ``sub`` weights shares a scale S (and, for affine types, a min M):

    affine:     x = S * u - M                 (Q2_K, Q4_K, Q5_K; Q4_1, Q5_1)
    symmetric:  x = S * (u - 2**(bits-1))     (Q3_K, Q6_K; Q4_0, Q5_0, Q8_0)

K-quants (block 256) store each sub-block's S (and M) as a small integer times an fp16 super-block scale
(``scale_bits`` bits: 4 for Q2_K, 6 for Q3_K/Q4_K/Q5_K, 8 for Q6_K); the legacy types (block 32) store S
and M in fp16. The byte layout of each type is in ggml/layout.py; the ``gguf`` package's decoder reads
what we write (tests/packing/test_ggml.py).

Our quantizer, for every type: each sub-block's range is searched over shrink factors for the smallest
rounding error weighted by the input's mean square per column (``importance``, what llama.cpp's importance
matrix holds; None weighs every weight alike); the sub-block scales are then rounded to the super-block
grid, trying the integers on either side of each, and the codes rounded to the final scales.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BitallocError

QK_K = 256
SHRINK = tuple(1 - 0.04 * i for i in range(12))       # range shrink factors tried per sub-block
ROWS = 256                                            # rows quantized at a time (bounded temporaries)


@dataclass(frozen=True)
class GgmlType:
    name: str
    block: int            # weights per block
    sub: int              # weights per sub-block sharing one scale
    bits: int
    affine: bool          # a min per sub-block (x = S u - M) or symmetric around 2**(bits-1)
    scale_bits: int       # K-quants: bits of each sub-block scale (and min); 0: fp16 per block
    block_bytes: int

    @property
    def bpw(self) -> float:
        """True bits per weight (codes, scales and mins: the whole block)."""
        return self.block_bytes * 8 / self.block

    @property
    def offset(self) -> int:
        return 0 if self.affine else 2 ** (self.bits - 1)

    def fits(self, in_features: int) -> bool:
        return in_features % self.block == 0


TYPES = {t.name: t for t in (
    GgmlType("Q2_K", QK_K, 16, 2, True, 4, 84),
    GgmlType("Q3_K", QK_K, 16, 3, False, 6, 110),
    GgmlType("Q4_K", QK_K, 32, 4, True, 6, 144),
    GgmlType("Q5_K", QK_K, 32, 5, True, 6, 176),
    GgmlType("Q6_K", QK_K, 16, 6, False, 8, 210),
    GgmlType("Q4_0", 32, 32, 4, False, 0, 18),
    GgmlType("Q4_1", 32, 32, 4, True, 0, 20),
    GgmlType("Q5_0", 32, 32, 5, False, 0, 22),
    GgmlType("Q5_1", 32, 32, 5, True, 0, 24),
    GgmlType("Q8_0", 32, 32, 8, False, 0, 34),
)}
FLOAT_TYPES = {"F16": 16, "BF16": 16, "F32": 32}


# the K-quant of each width, and llama.cpp's fallback where a row is not a multiple of its 256-weight block
BY_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def get_type(name: str) -> GgmlType:
    t = TYPES.get(str(name).upper())
    if t is None:
        raise BitallocError(f"unknown ggml type {name!r}: choose one of {', '.join(TYPES)} (or F16)")
    return t


@dataclass
class GgmlQuantized:
    """One matrix in a ggml type: codes ``u`` (rows, in) uint8, per sub-block scales ``S`` and mins ``M``
    (rows, in / sub) float32 as the file's numbers give them, and the stored integers behind them."""
    type: GgmlType
    u: torch.Tensor
    S: torch.Tensor
    M: torch.Tensor
    d: torch.Tensor        # (rows, in / block) fp16 super scales (legacy: the scale itself)
    dmin: torch.Tensor     # (rows, in / block) fp16 super mins (legacy affine: the stored min, x = d u + m)
    sc: torch.Tensor       # (rows, in / sub) int: K-quants' sub-block scale integers (signed for symmetric)
    m: torch.Tensor        # (rows, in / sub) int: K-quants' sub-block min integers

    def to(self, device) -> "GgmlQuantized":
        return GgmlQuantized(self.type, *(getattr(self, k).to(device) for k in ("u", "S", "M", "d", "dmin", "sc", "m")))

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.u.shape
        u = self.u.view(rows, -1, self.type.sub).float()
        x = self.S[..., None] * (u - self.type.offset)
        if self.type.affine:
            x = x - self.M[..., None]
        return x.reshape(rows, cols)


def quantize(W: torch.Tensor, type_: GgmlType | str, importance: torch.Tensor | None = None) -> GgmlQuantized:
    """``W`` (out, in) in the ggml type; ``in`` must be a multiple of the type's block."""
    t = get_type(type_) if isinstance(type_, str) else type_
    rows, cols = W.shape
    if not t.fits(cols):
        raise BitallocError(f"{t.name} needs rows that are a multiple of {t.block} weights; this matrix has {cols}: "
                            f"use a type with {32}-weight blocks (Q4_0, Q5_0, Q8_0) for it")
    parts = [_quantize_rows(W[r:r + ROWS].float(), t, importance) for r in range(0, rows, ROWS)]
    return GgmlQuantized(t, *(torch.cat([p[i] for p in parts]) for i in range(7)))


def fake(W: torch.Tensor, type_: GgmlType | str, importance: torch.Tensor | None = None) -> torch.Tensor:
    """W as the ggml type leaves it (float32)."""
    return quantize(W, type_, importance).dequantize()


def _quantize_rows(W: torch.Tensor, t: GgmlType, importance: torch.Tensor | None):
    rows, cols = W.shape
    X = W.view(rows, cols // t.sub, t.sub)
    h = None if importance is None else importance.float().to(W.device).clamp(min=0).view(1, cols // t.sub, t.sub)
    maxq = 2 ** t.bits - 1
    S, M = _affine_range(X, h, maxq, around_zero=t.scale_bits > 0) if t.affine else (_symmetric_scale(X, h, t), None)
    nb = cols // t.block
    per = t.block // t.sub
    if t.scale_bits == 0:                                   # legacy: S (and the min) in fp16, one per block
        d = S.half()
        S = d.float()
        if t.affine:
            dmin = (-M).half()                              # stored as the additive min: x = d u + m
            M = -dmin.float()
        else:
            dmin = torch.zeros_like(d)
            M = torch.zeros_like(S)
        sc = m = torch.zeros(rows, cols // t.sub, dtype=torch.int32, device=W.device)
        u = _codes(X, S, M, t)
        return u.view(rows, cols), S, M, d, dmin, sc, m
    S, M, d, dmin, sc, m = _super_scales(X, h, S, M, t, rows, nb, per)
    u = _codes(X, S, M, t)
    return u.view(rows, cols), S, M, d, dmin, sc, m


def _codes(X, S, M, t: GgmlType) -> torch.Tensor:
    s = S[..., None]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    if t.affine:
        u = torch.round((X + M[..., None]) / safe)
    else:
        u = torch.round(X / safe) + t.offset
    u = torch.where(s == 0, torch.full_like(u, t.offset), u)
    return u.clamp(0, 2 ** t.bits - 1).to(torch.uint8)


def _error(X, h, S, M, t: GgmlType) -> torch.Tensor:
    """Weighted squared rounding error of each sub-block (…, nsub) at scales S (and mins M): the values
    ``_codes`` gives, in place on one temporary (the search calls this 24 times per type and matrix). A zero
    scale gives the value −M (or 0) whatever the code, as there."""
    s = S[..., None]
    safe = torch.where(s == 0, torch.ones_like(s), s)
    if t.affine:
        m = M[..., None]
        x = (X + m).div_(safe).round_().clamp_(0, 2 ** t.bits - 1).mul_(s).sub_(m)
    else:
        x = torch.div(X, safe).round_().add_(t.offset).clamp_(0, 2 ** t.bits - 1).sub_(t.offset).mul_(s)
    err = x.sub_(X).square_()
    return (err.mul_(h) if h is not None else err).sum(-1)


class _Best:
    """Per sub-block, the candidate values with the smallest error offered so far."""

    def __init__(self):
        self.err, self.values = None, ()

    def offer(self, err: torch.Tensor, *values: torch.Tensor) -> None:
        if self.err is None:
            self.err, self.values = err, values
            return
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.values = tuple(torch.where(better, v, b) for v, b in zip(values, self.values))


def _affine_range(X, h, maxq: int, around_zero: bool):
    """Scale and min of each sub-block, its range shrunk by the best factor of SHRINK. ``around_zero``
    (K-quants: the min's integer is unsigned) keeps 0 inside the range and shrinks toward it."""
    lo, hi = X.amin(-1), X.amax(-1)
    if around_zero:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        centre = torch.zeros_like(lo)
    else:
        centre = (lo + hi) / 2
    t = GgmlType("", 0, X.shape[-1], int(maxq).bit_length(), True, 0, 0)
    best = _Best()
    for p in SHRINK:
        a, b = centre + p * (lo - centre), centre + p * (hi - centre)
        S, M = (b - a) / maxq, -a
        best.offer(_error(X, h, S, M, t), S, M)
    return best.values


def _symmetric_scale(X, h, t: GgmlType) -> torch.Tensor:
    """Signed scale of each sub-block: the weight of largest magnitude maps to the most negative code (or
    the most positive), shrunk by the best factor of SHRINK."""
    idx = X.abs().argmax(-1, keepdim=True)
    v = X.gather(-1, idx)[..., 0]
    best = _Best()
    for base in (v / -t.offset, v / max(t.offset - 1, 1)):
        for p in SHRINK:
            best.offer(_error(X, h, base * p, None, t), base * p)
    return best.values[0]


def _super_scales(X, h, S, M, t: GgmlType, rows: int, nb: int, per: int):
    """K-quants: S (and M) of each sub-block as integers times an fp16 scale per super-block; each integer
    is the better of the two nearest (by the sub-block's weighted error)."""
    levels = 2 ** t.scale_bits
    Sb = S.view(rows, nb, per)
    if t.affine:
        d = (Sb.amax(-1) / (levels - 1)).half()
        Mb = M.view(rows, nb, per)
        dmin = (Mb.amax(-1) / (levels - 1)).half()
        lo_s, hi_s, lo_m, hi_m = 0, levels - 1, 0, levels - 1
    else:
        idx = Sb.abs().argmax(-1, keepdim=True)
        d = (Sb.gather(-1, idx)[..., 0] / -(levels // 2)).half()
        dmin = torch.zeros_like(d)
        lo_s, hi_s = -(levels // 2), levels // 2 - 1
    df = d.float().repeat_interleave(per, dim=1)
    dmf = dmin.float().repeat_interleave(per, dim=1)

    def ints(value, scale, lo, hi):
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        r = value / safe
        return [torch.where(scale == 0, torch.zeros_like(r), f(r)).clamp(lo, hi) for f in (torch.floor, torch.ceil)]
    best = _Best()
    for sc in ints(S, df, lo_s, hi_s):
        for m in (ints(M, dmf, lo_m, hi_m) if t.affine else [torch.zeros_like(sc)]):
            best.offer(_error(X, h, df * sc, dmf * m, t), sc, m)
    sc, m = (v.to(torch.int32) for v in best.values)
    return df * sc, dmf * m, d, dmin, sc, m
