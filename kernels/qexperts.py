"""QuantExperts: packed storage for the experts of an MoE layer kept in one 3-D parameter (transformers 5.x
``experts.gate_up_proj`` (E, out, in), GPT-OSS's transposed (E, in, out)).

Each expert is its own packed matrix (kernels/pack.py layout, a QuantLinear's buffers), so a per-expert plan
may give every expert its own width; a per-layer plan packs the whole stack as one (E·out, in) matrix.
Experts a plan keeps at 16 bits are stored as fp16 matrices. The experts module keeps its own forward: a
forward pre-hook puts the dequantized 3-D weight where the parameter was, and a forward hook drops it
afterwards, so outputs equal the fake-quantized model's exactly (the same ``(q − zero)·scale`` in float32,
cast to the model's dtype). State-dict keys: ``{experts module}.quantized.{parameter}.experts.{e}.qweight``.
"""
from __future__ import annotations

import torch
from torch import nn

from .qlinear import QuantLinear


class FloatExpert(nn.Module):
    """An expert matrix kept at 16 bits: (out, in) fp16."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.float16))

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()


class QuantExperts(nn.Module):
    """The packed experts of one 3-D parameter. ``parts``: one module per expert, or one for the stack."""

    def __init__(self, parts: list[nn.Module], shape: tuple[int, int, int], transposed: bool, dtype: torch.dtype):
        super().__init__()
        self.experts = nn.ModuleList(parts)
        self.shape, self.transposed, self.dtype = tuple(shape), transposed, dtype      # the raw parameter's

    def weight(self) -> torch.Tensor:
        """The dequantized parameter, shaped and typed as the original."""
        E, a, b = self.shape
        out_f, in_f = (b, a) if self.transposed else (a, b)
        W = torch.cat([m.dequantized() for m in self.experts]).view(E, out_f, in_f)      # (E, out, in) fp32
        return (W.transpose(1, 2).contiguous() if self.transposed else W).to(self.dtype)   # the layout of the original

    def extra_repr(self) -> str:
        widths = [getattr(m, "bits", 16) for m in self.experts]
        return f"shape={self.shape}, transposed={self.transposed}, bits={widths}"


def _put_weights(module: nn.Module, args) -> None:
    for name, q in module.quantized.items():
        setattr(module, name, q.weight())


def _drop_weights(module: nn.Module, args, output) -> None:
    for name in module.quantized:
        module.__dict__.pop(name, None)


def attach(module: nn.Module, param: str, packed: QuantExperts) -> None:
    """Replace ``module``'s 3-D parameter ``param`` by ``packed`` (hooks installed once per module)."""
    module._parameters.pop(param, None)
    if not hasattr(module, "quantized"):
        module.quantized = nn.ModuleDict()
        module.register_forward_pre_hook(_put_weights)
        module.register_forward_hook(_drop_weights)
    module.quantized[param] = packed


def empty_part(spec, out_features: int, in_features: int) -> nn.Module:
    """An unfilled part for ``spec`` (filled by a state dict when loading)."""
    if spec.is_float:
        return FloatExpert(out_features, in_features)
    return QuantLinear(in_features, out_features, spec.bits, spec.group_size, spec.symmetric)
