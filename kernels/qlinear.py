"""QuantLinear: a Linear layer stored at its planned width (kernels/pack.py layout) and run by the Triton
kernels on CUDA (fp16/bf16 activations) or by the torch twin elsewhere."""
from __future__ import annotations

import math

import torch
from torch import nn

from .pack import check_bits, n_groups, pack_last_dim, pack_weight
from .reference import qmm_reference
from .triton_qmm import qmm_triton, triton_available


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W stored packed. Buffers (all in the state dict, no pickle needed):

        qweight int32 (ceil(K/32)*bits, N)   scales fp16 (G, N)   qzeros int32 (G, ceil(N/32)*bits) unless
        symmetric   bias (N,) when the original layer had one
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 symmetric: bool = False, bias: bool = False, bias_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        check_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        G = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features / 32) * bits, out_features,
                                                    dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(G, out_features, dtype=torch.float16, device=device))
        if not symmetric:
            self.register_buffer("qzeros", torch.zeros(G, math.ceil(out_features / 32) * bits,
                                                       dtype=torch.int32, device=device))
        else:
            self.qzeros = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, q, bias: torch.Tensor | None = None) -> "QuantLinear":
        """From an alloc.quantize.QuantizedWeight (codes (N, K), scales/zeros (N, G))."""
        out_f, in_f = q.codes.shape
        spec = q.spec
        m = cls(in_f, out_f, spec.bits, spec.group_size, spec.symmetric, bias is not None,
                bias.dtype if bias is not None else torch.float32, device=q.codes.device)
        m.qweight.copy_(pack_weight(q.codes, spec.bits))
        m.scales.copy_(q.scales.t().half())
        if not spec.symmetric:
            m.qzeros.copy_(pack_last_dim(q.zeros.t().contiguous(), spec.bits))
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and triton_available():
            y = qmm_triton(x, self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)
        else:
            y = qmm_reference(x, self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) the codes stand for."""
        from .reference import dequantize_packed
        return dequantize_packed(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.in_features)

    def packed_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.qzeros) if t is not None)

    def extra_repr(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {g}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, bias={self.bias is not None}")
