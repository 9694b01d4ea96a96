"""MixedQuantLinear: a Linear layer whose output rows have their own widths (a per-row plan).

The rows of each width form one segment, stored exactly as a QuantLinear of that width stores its weight
(kernels/pack.py layout), segments in increasing width, and the three tensors of all segments concatenated
into flat buffers:

    qweight  int32  [segment 2-bit (ceil(K/32)*2, n2) | segment 3-bit (ceil(K/32)*3, n3) | ...]  flattened
    scales   fp16   [(G, n2) | (G, n3) | ...]                                                 flattened
    qzeros   int32  [(G, ceil(n2/32)*2) | (G, ceil(n3/32)*3) | ...]  (asymmetric only)    flattened
    row_tags uint8  (ceil(N/2),)  the width of each output row, 4 bits each, two rows per byte

The row order is not stored: rows sorted by width (stable) give the segments, so the tags are enough to put
every output back in its place. On CUDA one Triton launch covers every segment (kernels/triton_mixed.py; a
layer mixing more than four widths falls back to one launch per segment);
elsewhere the torch twin dequantizes the whole weight and does one matmul, so the packed layer computes
exactly what the fake-quantized one does.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .pack import check_bits, n_groups, pack_last_dim, pack_weight
from .reference import dequantize_packed

MAX_SEGMENTS = 4


def pack_tags(row_bits: torch.Tensor) -> torch.Tensor:
    """(N,) widths -> (ceil(N/2),) uint8, row 2i in the low nibble of byte i, row 2i+1 in the high one."""
    b = row_bits.to(torch.uint8)
    if b.numel() % 2:
        b = torch.cat([b, b.new_zeros(1)])
    return b[0::2] | (b[1::2] << 4)


def unpack_tags(tags: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_tags`: (ceil(N/2),) uint8 -> (N,) int8 widths."""
    both = torch.stack([tags & 0xF, tags >> 4], dim=1).reshape(-1)
    return both[:n].to(torch.int8)


def segment_layout(row_bits: torch.Tensor, in_features: int, group_size: int, symmetric: bool) -> list[dict]:
    """Per segment (increasing width): bits, rows (n), first sorted row, and where its tensors start in the
    flat buffers (qw/s/qz offsets, element counts)."""
    G = n_groups(in_features, group_size)
    words = math.ceil(in_features / 32)
    out, row, qw, s, qz = [], 0, 0, 0, 0
    for b in sorted(set(row_bits.tolist())):
        n = int((row_bits == b).sum())
        zw = 0 if symmetric else math.ceil(n / 32) * b
        out.append({"bits": b, "n": n, "row0": row, "qw": qw, "s": s, "qz": qz, "qw_len": words * b * n,
                    "s_len": G * n, "qz_len": G * zw, "zero_words": zw})
        row, qw, s, qz = row + n, qw + words * b * n, s + G * n, qz + G * zw
    return out


class MixedQuantLinear(nn.Module):
    """y = x @ dequant(W).T + b for W whose rows have the widths ``row_bits`` (layout in the module doc)."""

    def __init__(self, in_features: int, out_features: int, row_bits: torch.Tensor, group_size: int = 128,
                 symmetric: bool = False, bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        row_bits = torch.as_tensor(row_bits, dtype=torch.int8).reshape(-1).cpu()
        if row_bits.numel() != out_features:
            raise ValueError(f"row_bits has {row_bits.numel()} rows, the layer {out_features}")
        for b in set(row_bits.tolist()):
            check_bits(b)
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        self.layout = segment_layout(row_bits, in_features, group_size, symmetric)
        last = self.layout[-1]
        self.register_buffer("qweight", torch.zeros(last["qw"] + last["qw_len"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(last["s"] + last["s_len"], dtype=torch.float16, device=device))
        if not symmetric:
            self.register_buffer("qzeros", torch.zeros(last["qz"] + last["qz_len"], dtype=torch.int32, device=device))
        else:
            self.qzeros = None
        self.register_buffer("row_tags", pack_tags(row_bits).to(device))
        order = torch.argsort(row_bits, stable=True)                   # sorted position -> layer row
        self.register_buffer("order", order.to(torch.int32).to(device), persistent=False)
        self.register_buffer("inverse", torch.argsort(order).to(device), persistent=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @property
    def row_bits(self) -> torch.Tensor:
        return unpack_tags(self.row_tags.cpu(), self.out_features)

    def segment(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(qweight (words*bits, n), scales (G, n), qzeros (G, zero words) or None) of segment ``k``: views."""
        seg, G = self.layout[k], n_groups(self.in_features, self.group_size)
        qw = self.qweight[seg["qw"]:seg["qw"] + seg["qw_len"]].view(-1, seg["n"])
        s = self.scales[seg["s"]:seg["s"] + seg["s_len"]].view(G, seg["n"])
        qz = None if self.symmetric else self.qzeros[seg["qz"]:seg["qz"] + seg["qz_len"]].view(G, seg["zero_words"])
        return qw, s, qz

    @classmethod
    def from_quantized(cls, q, bias: torch.Tensor | None = None) -> "MixedQuantLinear":
        """From an alloc.quantize.RowQuantized (one QuantizedWeight per width, rows in row order)."""
        first = next(iter(q.parts.values()))
        m = cls(first.codes.shape[1], q.row_bits.numel(), q.row_bits, q.spec.group_size, q.spec.symmetric,
                bias is not None, bias.dtype if bias is not None else torch.float32, device=first.codes.device)
        for k, seg in enumerate(m.layout):
            part = q.parts[seg["bits"]]
            qw, s, qz = m.segment(k)
            qw.copy_(pack_weight(part.codes, seg["bits"]))
            s.copy_(part.scales.t().half())
            if qz is not None:
                qz.copy_(pack_last_dim(part.zeros.t().contiguous(), seg["bits"]))
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .triton_qmm import triton_available
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
            if len(self.layout) <= MAX_SEGMENTS:
                from .triton_mixed import qmm_mixed_triton
                y = qmm_mixed_triton(x, self)
            else:                       # 5 or 6 widths in one layer: one launch per segment
                y = self._per_segment(x)
        else:
            y = x @ self.dequantized().to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _per_segment(self, x: torch.Tensor) -> torch.Tensor:
        from .triton_qmm import qmm_triton
        y = torch.cat([qmm_triton(x, *self.segment(k), seg["bits"], self.group_size, self.in_features)
                       for k, seg in enumerate(self.layout)], dim=-1)
        return y.index_select(-1, self.inverse.to(y.device))

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) the codes stand for, rows in their own order."""
        parts = [dequantize_packed(*self.segment(k), seg["bits"], self.group_size, self.in_features)
                 for k, seg in enumerate(self.layout)]
        return torch.cat(parts)[self.inverse.to(parts[0].device)]

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros, self.row_tags)
                   if t is not None)

    def extra_repr(self) -> str:
        counts = {seg["bits"]: seg["n"] for seg in self.layout}
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows per width={counts}, {g}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, bias={self.bias is not None}")
