"""MixedQuantLinear: a Linear layer whose output rows have their own widths (a per-row plan).

The rows of each width form one segment, stored exactly as a QuantLinear of that width (kernels/pack.py
layout): ``seg3.qweight``, ``seg3.scales``, ``seg3.qzeros`` for the 3-bit rows, in row order. The row order
is not stored: rows sorted by width (stable) give the segments, so the 4-bit width tags (``row_tags``, two
rows per byte) are enough to put every output back in its place.

    y[..., rows of width b] = x @ dequant(segment b).T

On CUDA each segment runs QuantLinear's Triton kernel: one launch per segment, at most one per width (a single
launch covering every segment is not written yet). Elsewhere the torch twin dequantizes the whole weight and
does one matmul, so the packed layer computes exactly what the fake-quantized one does.
"""
from __future__ import annotations

import torch
from torch import nn

from .pack import check_bits
from .qlinear import QuantLinear


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


class MixedQuantLinear(nn.Module):
    """y = x @ dequant(W).T + b for W whose rows have the widths ``row_bits``. Buffers (all in the state dict):
    ``row_tags`` uint8 (ceil(N/2),), one QuantLinear per width as ``seg{bits}``, ``bias`` (N,) if any."""

    def __init__(self, in_features: int, out_features: int, row_bits: torch.Tensor, group_size: int = 128,
                 symmetric: bool = False, bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        row_bits = torch.as_tensor(row_bits, dtype=torch.int8).reshape(-1).cpu()
        if row_bits.numel() != out_features:
            raise ValueError(f"row_bits has {row_bits.numel()} rows, the layer {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.symmetric = group_size, symmetric
        self.widths = sorted(set(row_bits.tolist()))
        for b in self.widths:
            check_bits(b)
            n = int((row_bits == b).sum())
            self.add_module(f"seg{b}", QuantLinear(in_features, n, b, group_size, symmetric, device=device))
        self.register_buffer("row_tags", pack_tags(row_bits).to(device))
        order = torch.argsort(row_bits, stable=True)                   # segment rows -> layer rows
        self.register_buffer("inverse", torch.argsort(order).to(device), persistent=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @property
    def row_bits(self) -> torch.Tensor:
        return unpack_tags(self.row_tags.cpu(), self.out_features)

    def segments(self) -> list[QuantLinear]:
        return [getattr(self, f"seg{b}") for b in self.widths]

    @classmethod
    def from_quantized(cls, q, bias: torch.Tensor | None = None) -> "MixedQuantLinear":
        """From an alloc.quantize.RowQuantized (one QuantizedWeight per width, rows in row order)."""
        first = next(iter(q.parts.values()))
        m = cls(first.codes.shape[1], q.row_bits.numel(), q.row_bits, q.spec.group_size, q.spec.symmetric,
                bias is not None, bias.dtype if bias is not None else torch.float32, device=first.codes.device)
        for b, part in q.parts.items():
            seg = getattr(m, f"seg{b}")
            seg.load_state_dict(QuantLinear.from_quantized(part).state_dict())
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .triton_qmm import triton_available
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
            y = torch.cat([seg(x) for seg in self.segments()], dim=-1)   # one kernel per width, rows by width
            y = y.index_select(-1, self.inverse.to(y.device))
        else:        # the torch twin: one matmul with the whole dequantized weight, as the fake-quantized model
            y = x @ self.dequantized().to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) the codes stand for, rows in their own order."""
        W = torch.cat([seg.dequantized() for seg in self.segments()])
        return W[self.inverse.to(W.device)]

    def packed_bytes(self) -> int:
        return sum(seg.packed_bytes() for seg in self.segments()) + self.row_tags.numel()

    def extra_repr(self) -> str:
        counts = {b: int((self.row_bits == b).sum()) for b in self.widths}
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows per width={counts}, {g}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, bias={self.bias is not None}")


__all__ = ["MixedQuantLinear", "pack_tags", "unpack_tags"]
