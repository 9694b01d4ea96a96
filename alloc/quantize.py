"""Quantizers: round-to-nearest (RTN) and GPTQ, group-wise, one interface (``Quantizer``: the method and its
refinements, at the end of the file).

Both return a QuantizedWeight: integer codes plus per-group scales and zeros, exactly what the packer stores;
``dequantize`` gives back the float weight the codes stand for (W_hat = (q - zero) * scale). Scales are
rounded to fp16 here, so a fake-quantized model and the packed one compute the same numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import BitallocError
from .gptq_sweep import Hessian, error_rows, prepare, start, sweep
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


def range_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable float32) and integer zero of groups spanning [xmin, xmax] (xmin ≤ 0 ≤ xmax)
    with codes 0..maxq (a number, or a tensor broadcasting against the groups: per-row widths)."""
    if symmetric:
        scale = (2 * torch.maximum(-xmin, xmax) / maxq).clamp(min=1e-6).half().float()
        zero = torch.zeros_like(scale, dtype=torch.int32) + ((maxq + 1) // 2 if isinstance(maxq, int)
                                                             else ((maxq + 1) // 2).to(torch.int32))
        return scale, zero
    scale = ((xmax - xmin) / maxq).clamp(min=1e-6).half().float()         # stored as fp16: quantize with it
    zero = torch.round(-xmin / scale).clamp(min=0)
    zero = zero.clamp(max=maxq) if isinstance(maxq, int) else torch.minimum(zero, maxq)
    return scale, zero.to(torch.int32)


CLIP_GRID = tuple(1 - 0.05 * i for i in range(10))     # range shrink factors tried by the clipping search


def searched_params(Wg: torch.Tensor, maxq, symmetric: bool, importance: torch.Tensor | None = None,
                    grid=CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each group of ``Wg`` (..., g) (zero-padded), its range shrunk by the factor of ``grid``
    that minimizes the group's rounding error Σ_j h_j (w_j − ŵ_j)² (``importance`` h (..., g), e.g. the input's
    mean square per column, as llama.cpp's importance matrix weights it; None: 1). Grid [1.0]: min/max RTN."""
    Wg = Wg.float()
    xmin, xmax = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    best = None
    for p in grid:
        scale, zero = range_params(p * xmin, p * xmax, maxq, symmetric)
        if len(grid) == 1:
            return scale, zero
        s, z = scale[..., None], zero[..., None]
        top = maxq if isinstance(maxq, int) else maxq[..., None]
        q = torch.clamp(torch.round(Wg / s) + z, 0, top) if isinstance(maxq, int) else \
            torch.minimum(torch.round(Wg / s).add_(z).clamp_(min=0), top)
        err = (Wg - (q - z) * s).square_()
        err = (err * importance if importance is not None else err).sum(-1)
        if best is None:
            best, best_scale, best_zero = err, scale, zero
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def group_params(W: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None,
                 grid=(1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of every group of ``W`` (out, in) -> (out, G) each; the range always includes 0.
    ``grid``/``importance``: the clipping search of ``searched_params`` (default: the plain min/max range)."""
    maxq = 2**spec.bits - 1
    Wg = _group_view(W.float(), spec.group_size, 0.0)            # zero padding changes no range and no error
    h = None if importance is None else _group_view(importance.float()[None], spec.group_size, 0.0)
    return searched_params(Wg, maxq, spec.symmetric, h, grid)


def _expand(t: torch.Tensor, spec: QuantSpec, in_features: int) -> torch.Tensor:
    g = in_features if spec.group_size == -1 else spec.group_size
    return t.repeat_interleave(g, dim=1)[:, :in_features]


RTN_ROWS = 1024          # rows rounded at a time: float32 temporaries of a few rows, not of the whole matrix


def rtn(W: torch.Tensor, spec: QuantSpec, *, importance: torch.Tensor | None = None,
        grid=(1.0,)) -> QuantizedWeight:
    """Round-to-nearest, group-wise. ``W`` (out, in), any float dtype; rounded ``RTN_ROWS`` rows at a time
    (groups never span rows), so a 70B-size matrix needs its int32 codes and little more. ``grid`` /
    ``importance`` (in,): search each group's clipping (``searched_params``)."""
    codes = torch.empty(W.shape, dtype=torch.int32, device=W.device)
    scales, zeros = [], []
    for r in range(0, W.shape[0], RTN_ROWS):
        Wr = W[r:r + RTN_ROWS].float()
        scale, zero = group_params(Wr, spec, importance, grid)
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


def rtn_rows(W: torch.Tensor, spec: QuantSpec, row_bits: torch.Tensor, *, grid=(1.0,)) -> RowQuantized:
    """Round-to-nearest with each output row at its own width (rows never share a group)."""
    parts = {}
    for b in sorted(set(row_bits.tolist())):
        r = torch.nonzero(row_bits == b)[:, 0]
        parts[b] = rtn(W[r], QuantSpec(b, spec.group_size, spec.symmetric), grid=grid)
    return RowQuantized(row_bits, parts, spec)


def fake_quantize_rows(W: torch.Tensor, spec: QuantSpec, row_bits: torch.Tensor | None, grid=None) -> torch.Tensor:
    """fake_quantize for a layer of a plan: per row when it has ``row_bits``."""
    if row_bits is None:
        return fake_quantize(W, spec, grid=grid)
    out = torch.empty_like(W)
    for b in sorted(set(row_bits.tolist())):
        r = torch.nonzero(row_bits == b)[:, 0]
        out[r] = fake_quantize(W[r], QuantSpec(b, spec.group_size, spec.symmetric), grid=grid)
    return out


def fake_quantize(W: torch.Tensor, spec: QuantSpec, rows: int = 2048, grid=None) -> torch.Tensor:
    """W -> dequantize(rtn(W)) as ``--quantizer rtn`` rounds (``grid`` None: its clipping search; (1.0,): plain
    min/max), same dtype as W; fp16 specs only round to fp16. ``rows`` output rows at a time (groups never span
    rows, so the result is the same): float32 temporaries stay small for large W."""
    if spec.is_float:
        return W.half().to(W.dtype)
    if spec.ggml:
        return ggml_quantize(W, spec).dequantize().to(W.dtype)
    grid = DEFAULTS["rtn"].grid if grid is None else grid
    if W.shape[0] <= rows:
        return rtn(W, spec, grid=grid).dequantize().to(W.dtype)
    out = torch.empty_like(W)
    for r in range(0, W.shape[0], rows):
        out[r:r + rows] = rtn(W[r:r + rows], spec, grid=grid).dequantize().to(W.dtype)
    return out


def ggml_quantize(W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None):
    """A ggml-type option (``spec.ggml``): llama.cpp's blocks by our importance-weighted search
    (alloc/ggml/types.py), each column's error weighted by H's diagonal (its input's energy) when given."""
    from .ggml.types import quantize as quantize_ggml
    importance = None if H is None else torch.diagonal(H).float()
    return quantize_ggml(W, spec.ggml_for(W.shape[1]), importance)


def gptq(W: torch.Tensor, H: torch.Tensor | None, spec: QuantSpec, *, block_size: int = 128,
         damp: float = 0.01, row_bits: torch.Tensor | None = None, act_order: bool = False,
         grid=(1.0,), hessian: Hessian | None = None,
         losses: torch.Tensor | None = None) -> QuantizedWeight | RowQuantized:
    """GPTQ (Frantar et al. 2022): quantize columns in order, spreading each column's error over the
    columns not yet quantized through the inverse Hessian. ``W`` (out, in), ``H`` = XᵀX (in, in), or
    ``hessian``: its ``prepare``d form with this ``damp`` and ``act_order``, shared by several widths.

    Group parameters are taken from the error-updated weights when a group starts; with ``act_order`` the
    columns go in order of decreasing H_jj (the most active inputs first, whose error the others then
    absorb) and every group's parameters are fixed beforehand from the original weights ("static groups":
    the groups stay contiguous runs of columns, as the packer stores them). ``grid``: search each group's
    clipping, weighting each column's rounding error by H_jj (``searched_params``). With ``row_bits`` each
    output row rounds to its own grid (the column sweep is unchanged) and a RowQuantized comes back.
    ``losses``: (out,) float64 that gains each row's error on the damped H (gptq_sweep.sweep)."""
    out_f, in_f = W.shape
    hs = hessian if hessian is not None else prepare(H, damp, act_order, W.device)
    W, Wt = start(W, hs)
    h = hs.h

    g = in_f if spec.group_size == -1 else spec.group_size
    if spec.group_size != -1:
        block_size = max(block_size // g, 1) * g                            # groups never straddle blocks
    G = math.ceil(in_f / g)
    maxq = 2**spec.bits - 1 if row_bits is None else (2.0 ** row_bits.to(W.device).float() - 1)
    scales = torch.zeros(G, out_f, device=W.device)                            # group-major: a row per group
    zeros = torch.zeros(G, out_f, dtype=torch.int32, device=W.device)

    def params(cols, weight):
        """(out, 1) scale and zero of one group of columns ``cols`` (out, n) with column importance ``weight``."""
        top = maxq if row_bits is None else maxq[:, None]
        return searched_params(cols[:, None, :], top, spec.symmetric, weight[None, None, :], grid)

    static = act_order or spec.group_size == -1
    if static:                      # every group's parameters from the original weights, before the sweep
        for gi in range(G):
            s, z = params(W[:, gi * g:(gi + 1) * g], h[gi * g:(gi + 1) * g])
            scales[gi], zeros[gi] = s[:, 0], z[:, 0]
    group_of = (hs.perm // g).tolist()                                         # each swept column's group
    q_perm = torch.zeros(in_f, out_f, dtype=torch.int32, device=W.device)      # codes, a row per swept column

    def round_col(k, w):
        gi = group_of[k]
        if not static and k % g == 0:          # no act order: column k is column k of W, its group starts here
            s, z = params(Wt[k:k + g].T, h[k:k + g])
            scales[gi], zeros[gi] = s[:, 0], z[:, 0]
        q = torch.round(w / scales[gi]) + zeros[gi]
        q = torch.clamp(q, 0, maxq) if row_bits is None else torch.minimum(q.clamp(min=0), maxq)
        q_perm[k] = q.to(torch.int32)
        return (q - zeros[gi]) * scales[gi]
    sweep(Wt, hs.Hinv, block_size, round_col, losses)
    codes = torch.empty(out_f, in_f, dtype=torch.int32, device=W.device)
    codes[:, hs.perm] = q_perm.T
    scales, zeros = scales.T.contiguous(), zeros.T.contiguous()
    if row_bits is not None:
        return split_rows(codes, scales, zeros, row_bits, spec)
    return QuantizedWeight(codes, scales, zeros, spec)


QUANTIZERS = ("rtn", "gptq")


@dataclass(frozen=True)
class Quantizer:
    """How a plan's weights are rounded: ``method`` and its refinements (each measured in BENCHMARK terms on
    refllama-s and Gemma-3-270M before it became a default; examples/bench_quantizers.py).

    method:      rtn (round to nearest) or gptq (error feedback through the inverse Hessian of the inputs)
    clip:        search each group's clipping (range shrink) for the smallest rounding error; GPTQ weights
                 each column's error by its input's mean square, RTN counts every weight alike
    act_order:   gptq: sweep columns by decreasing input energy, group parameters fixed beforehand
    sequential:  gptq: within a block, each layer's XᵀX is collected with the layers before it already
                 quantized (q/k/v, then the output projection, then gate/up, then down)
    damp:        gptq: damping added to H's diagonal, as a fraction of its mean
    """

    method: str = "rtn"
    clip: bool = False
    act_order: bool = False
    sequential: bool = False
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.method not in QUANTIZERS:
            raise BitallocError(f"unknown quantizer {self.method!r}: choose one of {', '.join(QUANTIZERS)}")
        if not 0 <= self.damp < 1:
            raise BitallocError(f"GPTQ damping {self.damp} is out of range: give a fraction in [0, 1)")

    @property
    def grid(self) -> tuple[float, ...]:
        return CLIP_GRID if self.clip else (1.0,)

    def rtn(self, W, spec, **kw):
        if spec.ggml:
            return ggml_quantize(W, spec) if not kw else _no_ggml_rows(spec)
        return rtn(W, spec, grid=self.grid) if not kw else rtn_rows(W, spec, kw["row_bits"], grid=self.grid)

    def gptq(self, W, H, spec, **kw):
        """GPTQ; a ggml-type option by GPTQ on that type's grid (alloc/ggml/gptq.py)."""
        if spec.ggml:
            from .ggml.gptq import gptq_ggml
            from .ggml.types import get_type
            kw.pop("hessian", None)             # prepared with this quantizer's act order; ggml's is always on
            return gptq_ggml(W, H, get_type(spec.ggml_for(W.shape[1])), damp=self.damp) if not kw \
                else _no_ggml_rows(spec)
        return gptq(W, H, spec, damp=self.damp, act_order=self.act_order, grid=self.grid, **kw)

    def sweeps(self, spec: QuantSpec) -> bool:
        """Whether ``fake`` rounds ``spec`` by our GPTQ sweep (given an XᵀX): ggml types and fp16 it does not."""
        return self.method == "gptq" and not spec.is_float and not spec.ggml

    def prepare(self, H: torch.Tensor | None, options: list[QuantSpec], device=None) -> Hessian | None:
        """What GPTQ on ``H`` costs whatever the width (gptq_sweep.prepare), on ``device`` (the weight's; None:
        H's), for ``fake``'s ``hessian`` when one layer is rounded at several ``options``; None where ``fake``
        runs no GPTQ sweep on them."""
        if H is None or H.dim() != 2 or not any(self.sweeps(s) for s in options):
            return None
        return prepare(H, self.damp, self.act_order, device)

    def error_rows(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor,
                   hessian: Hessian | None = None) -> torch.Tensor:
        """(out,) float64 (ΔW H ΔWᵀ)_ii of each output row, ΔW = ``fake(W, spec, H)`` − W, ``H`` (in, in): what
        the probes price (the product in H's dtype). Where GPTQ sweeps, its own losses give it
        (gptq_sweep.error_rows) at no cost beyond the rounding; the product ΔW H would cost as much as the
        sweep again (out × in² each)."""
        W = W.detach().float()
        if self.sweeps(spec):
            hs = hessian if hessian is not None else self.prepare(H, [spec], W.device)
            losses = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
            dW = self.gptq(W, H, spec, hessian=hs, losses=losses).dequantize() - W.masked_fill(hs.dead[None, :], 0)
            return error_rows(dW, hs, losses)
        dW = (self.fake(W, spec, H, hessian) - W).to(H.dtype)               # the product in H's precision
        return ((dW @ H) * dW).sum(1, dtype=torch.float64)

    def fake(self, W: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None = None,
             hessian: Hessian | None = None) -> torch.Tensor:
        """W as this quantizer leaves it (float32; fp16 specs only round to fp16), the layer alone: GPTQ on
        the layer's own XᵀX ``H`` (the probes' view: the layers before it unquantized); RTN without one.
        ``hessian``: ``prepare(H)``, computed once for all of a layer's widths."""
        W = W.detach().float()
        if H is not None and H.dim() == 1:
            H = None                        # an embedding's token counts weigh its rows, not its inputs: RTN
        if spec.is_float:
            return W.half().float()
        if spec.ggml:
            return ggml_quantize(W, spec, H).dequantize()
        if self.method == "gptq" and H is not None:
            return self.gptq(W, H, spec, hessian=hessian).dequantize()
        return self.rtn(W, spec).dequantize()


def _no_ggml_rows(spec: QuantSpec):
    raise BitallocError(f"{spec.ggml} is one type per tensor: per-row widths need our formats (--options 2,3,4,8) "
                        "or plan per layer (--granularity layer)")


def as_quantizer(quantizer: "str | Quantizer") -> Quantizer:
    """A Quantizer from its name (``DEFAULTS``) or itself."""
    if isinstance(quantizer, Quantizer):
        return quantizer
    if quantizer not in QUANTIZERS:
        raise BitallocError(f"unknown quantizer {quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
    return DEFAULTS[quantizer]


# What "rtn" and "gptq" mean (examples/bench_quantizers.py; uniform W3 g128, 32 × 512 held-out tokens of
# eval.txt): Gemma-3-270M (fp 38.85) RTN 9113 → with clipping 3616; GPTQ 114.3, + act-order 76.5, + clipping
# 61.7, + sequential 114.0, all three 58.6. refllama-s (fp 11.917) RTN 12.92 → 12.78; GPTQ 12.57, + act-order
# 12.50, + clipping 12.36, + sequential 12.58. Sequential helps neither model and costs 4 passes per block: off.
DEFAULTS = {"rtn": Quantizer("rtn", clip=True), "gptq": Quantizer("gptq", clip=True, act_order=True)}
