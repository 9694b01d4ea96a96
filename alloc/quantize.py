"""Quantizers: round-to-nearest (RTN) and GPTQ, group-wise, one interface.

Both return a QuantizedWeight: integer codes plus per-group scales and zeros, exactly what the packer stores;
``dequantize`` gives back the float weight the codes stand for (W_hat = (q - zero) * scale). Scales are
rounded to fp16 here, so a fake-quantized model and the packed one compute the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .options import QuantSpec


@dataclass
class QuantizedWeight:
    codes: torch.Tensor            # (out, in) int32 in [0, 2**bits)
    scales: torch.Tensor           # (out, G) float32 holding fp16-representable values
    zeros: torch.Tensor            # (out, G) int32 (symmetric: the constant 2**(bits-1))
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        g = self.codes.shape[1] if self.spec.group_size == -1 else self.spec.group_size
        scale = self.scales.repeat_interleave(g, dim=1)[:, : self.codes.shape[1]]
        zero = self.zeros.repeat_interleave(g, dim=1)[:, : self.codes.shape[1]]
        return (self.codes - zero).float() * scale

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.codes.to(device), self.scales.to(device), self.zeros.to(device), self.spec)


def _group_view(W: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """(out, in) -> (out, G, g), padding the last group with ``fill``."""
    out_f, in_f = W.shape
    g = in_f if group_size == -1 else group_size
    G = math.ceil(in_f / g)
    if G * g != in_f:
        W = torch.cat([W, W.new_full((out_f, G * g - in_f), fill)], dim=1)
    return W.view(out_f, G, g)


def group_params(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every group of ``W`` (out, in) -> (out, G) each; the range always includes 0."""
    maxq = 2**spec.bits - 1
    W = W.float()
    if spec.symmetric:
        absmax = _group_view(W.abs(), spec.group_size, 0.0).amax(-1)
        scale = 2 * absmax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
    else:
        xmin = _group_view(W, spec.group_size, math.inf).amin(-1).clamp(max=0)
        xmax = _group_view(W, spec.group_size, -math.inf).amax(-1).clamp(min=0)
        scale = (xmax - xmin) / maxq
        zero = None
    scale = scale.clamp(min=1e-6).half().float()          # stored as fp16: quantize with what is stored
    if zero is None:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int32)
    return scale, zero


def _expand(t: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    g = in_features if spec.group_size == -1 else spec.group_size
    return t.repeat_interleave(g, dim=1)[:, :in_features]


RTN_ROWS = 1024          # rows rounded at a time: float32 temporaries of a few rows, not of the whole matrix


def rtn(W: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Round-to-nearest, group-wise. ``W`` (out, in), any float dtype; rounded ``RTN_ROWS`` rows at a time
    (groups never span rows), so a 70B-size matrix needs its int32 codes and little more."""
    codes = torch.empty(W.shape, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for r in range(0, W.shape[0], RTN_ROWS):
        Wr = W[r:r + RTN_ROWS].float()
        scale, zero = group_params(Wr, spec)
        s, z = _expand(scale, spec, W.shape[1]), _expand(zero, spec, W.shape[1])
        codes[r:r + RTN_ROWS] = torch.clamp(torch.round(Wr / s) + z, 0, 2**spec.bits - 1)
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(codes, torch.cat(scales), torch.cat(zeros), spec)


@dataclass
class RowQuantized:
    """A layer whose output rows have their own widths: one QuantizedWeight per width, holding that width's
    rows in row order (``rows[b]`` their indices), as the packer stores them (one segment per width)."""
    row_bits: torch.Tensor                  # (out,) int8
    parts: dict[int, QuantizedWeight]       # width -> the rows of that width
    spec: QuantSpec                         # the layer's group size and symmetry; bits = its widest row

    def to(self, device) -> "RowQuantized":
        return RowQuantized(self.row_bits, {b: q.to(device) for b, q in self.parts.items()}, self.spec)

    def rows(self, bits: int) -> torch.Tensor:
        return torch.nonzero(self.row_bits == bits)[:, 0]

    def dequantize(self) -> torch.Tensor:
        first = next(iter(self.parts.values()))
        out = torch.empty(self.row_bits.numel(), first.codes.shape[1], device=first.codes.device)
        for b, q in self.parts.items():
            out[self.rows(b)] = q.dequantize()
        return out


def split_rows(codes, scales, zeros, row_bits: torch.Tensor, spec: QuantSpec) -> RowQuantized:
    """Per-row codes/scales/zeros of a whole layer -> a RowQuantized (one part per width)."""
    parts = {}
    for b in sorted(set(row_bits.tolist())):
        r = torch.nonzero(row_bits == b)[:, 0]
        parts[b] = QuantizedWeight(codes[r], scales[r], zeros[r], QuantSpec(b, spec.group_size, spec.symmetric))
    return RowQuantized(row_bits, parts, spec)


def rtn_rows(W: torch.Tensor, spec: QuantSpec, row_bits: torch.Tensor) -> RowQuantized:
    """Round-to-nearest with each output row at its own width (rows never share a group)."""
    parts = {}
    for b in sorted(set(row_bits.tolist())):
        r = torch.nonzero(row_bits == b)[:, 0]
        parts[b] = rtn(W[r], QuantSpec(b, spec.group_size, spec.symmetric))
    return RowQuantized(row_bits, parts, spec)


def fake_quantize_rows(W: torch.Tensor, spec: QuantSpec, row_bits: torch.Tensor | None) -> torch.Tensor:
    """fake_quantize for a layer of a plan: per row when it has ``row_bits``."""
    if row_bits is None:
        return fake_quantize(W, spec)
    out = torch.empty_like(W)
    for b in sorted(set(row_bits.tolist())):
        r = torch.nonzero(row_bits == b)[:, 0]
        out[r] = fake_quantize(W[r], QuantSpec(b, spec.group_size, spec.symmetric))
    return out


def fake_quantize(W: torch.Tensor, spec: QuantSpec, rows: int = 2048) -> torch.Tensor:
    """W -> dequantize(rtn(W)), same dtype as W; fp16 specs only round to fp16. ``rows`` output rows at a
    time (groups never span rows, so the result is the same): float32 temporaries stay small for large W."""
    if spec.is_float:
        return W.half().to(W.dtype)
    if W.shape[0] <= rows:
        return rtn(W, spec).dequantize().to(W.dtype)
    out = torch.empty_like(W)
    for r in range(0, W.shape[0], rows):
        out[r:r + rows] = rtn(W[r:r + rows], spec).dequantize().to(W.dtype)
    return out


def _row_group_params(W: torch.Tensor, maxq: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """group_params for one group of columns ``W`` (out, g) with a per-row code range ``maxq`` (out,)."""
    W = W.float()
    if symmetric:
        scale = (2 * W.abs().amax(1) / maxq).clamp(min=1e-6).half().float()
        return scale[:, None], ((maxq + 1) // 2).to(torch.int32)[:, None]
    xmin, xmax = W.amin(1).clamp(max=0), W.amax(1).clamp(min=0)
    scale = ((xmax - xmin) / maxq).clamp(min=1e-6).half().float()
    zero = torch.minimum(torch.round(-xmin / scale).clamp(min=0), maxq).to(torch.int32)
    return scale[:, None], zero[:, None]


def gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, *, block_size: int = 128,
         damp: float = 0.01, row_bits: torch.Tensor | None = None) -> QuantizedWeight | RowQuantized:
    """GPTQ (Frantar et al. 2022): quantize columns in order, spreading each column's error over the
    columns not yet quantized through the inverse Hessian. ``W`` (out, in), ``H`` = XᵀX (in, in).
    Group parameters are taken from the error-updated weights when a group starts. With ``row_bits`` each
    output row rounds to its own grid (the column sweep is unchanged) and a RowQuantized comes back."""
    out_f, in_f = W.shape
    W = W.detach().float().clone()
    H = H.detach().to(W.device).float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype, device=H.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)      # (in, in), upper

    g = in_f if spec.group_size == -1 else spec.group_size
    if spec.group_size != -1:
        block_size = max(block_size // g, 1) * g                            # groups never straddle blocks
    G = math.ceil(in_f / g)
    maxq = 2**spec.bits - 1 if row_bits is None else (2.0 ** row_bits.to(W.device).float() - 1)
    codes = torch.zeros(out_f, in_f, dtype=torch.int32, device=W.device)       # on W's device (a GPU block)
    scales = torch.zeros(out_f, G, device=W.device)
    zeros = torch.zeros(out_f, G, dtype=torch.int32, device=W.device)

    def params(cols):
        if row_bits is None:
            return group_params(cols, QuantSpec(spec.bits, -1, spec.symmetric))
        return _row_group_params(cols, maxq, spec.symmetric)
    if spec.group_size == -1:
        scales[:], zeros[:] = params(W)

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            gi = col // g
            if spec.group_size != -1 and col % g == 0:
                s, z = params(W1[:, i:i + g])
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            w = W1[:, i]
            q = torch.round(w / scales[:, gi]) + zeros[:, gi]
            q = torch.clamp(q, 0, maxq) if row_bits is None else torch.minimum(q.clamp(min=0), maxq)
            codes[:, col] = q.to(torch.int32)
            err = (w - (q - zeros[:, gi]) * scales[:, gi]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if row_bits is not None:
        return split_rows(codes, scales, zeros, row_bits, spec)
    return QuantizedWeight(codes, scales, zeros, spec)
