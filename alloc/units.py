"""Which weights are quantizable, and which of them must share a width.

A Unit is one weight matrix seen as (out_features, in_features): an ``nn.Linear``, a GPT-2 ``Conv1D``
(stored transposed, handled here) or, when asked for, an ``nn.Embedding`` (rows = tokens). Embeddings and
the LM head stay in full precision unless named in ``include``.

Fused groups are siblings that read the same input (q/k/v, gate/up); ``--fuse`` makes a solver give them
one width, which lets a runtime fuse their matmuls.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BitallocError

# Sibling names that read the same input, per family (Llama/Mistral/Qwen2/OPT, BERT).
FUSED_SIBLINGS = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("qkv", ("query", "key", "value")),
    ("gate_up", ("gate_proj", "up_proj")),
    ("gate_up", ("w1", "w3")),
)
HEAD_NAMES = ("lm_head", "embed_out", "output")
HEAD_PARENTS = ("pooler",)          # BERT's pooler feeds only the (unused) CLS head, not sentence embeddings


@dataclass(frozen=True)
class Unit:
    """A quantizable weight: ``name`` as in ``model.named_modules()``, ``shape`` = (out, in)."""

    name: str
    shape: tuple[int, int]
    kind: str = "linear"                 # "linear", "conv1d" (weight stored (in, out)) or "embedding"
    fused_group: str | None = None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def unit_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def weight_matrix(module: nn.Module, kind: str) -> torch.Tensor:
    """The weight as (out, in), a view for Linear/Embedding, a transposed view for Conv1D."""
    return module.weight.t() if kind == "conv1d" else module.weight


def set_weight_matrix(module: nn.Module, kind: str, value: torch.Tensor) -> None:
    with torch.no_grad():
        target = module.weight
        target.copy_(value.t() if kind == "conv1d" else value)


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        parts = name.split(".")
        if module is out or parts[-1] in HEAD_NAMES or any(p in HEAD_PARENTS for p in parts[:-1]):
            heads.add(name)
    return heads


def find_units(model: nn.Module, *, include: tuple[str, ...] | list[str] = (), fuse: bool = True) -> list[Unit]:
    """Quantizable units in module order.

    Default: every Linear/Conv1D except the LM head. ``include`` adds modules by name or glob pattern
    (``lm_head``, ``model.embed_tokens``, ``*embed*``); naming a module bitalloc cannot quantize is an error.
    ``fuse`` fills ``Unit.fused_group`` (whether solvers honour it is their ``fuse`` option).
    """
    heads = _head_names(model)
    modules = dict(model.named_modules())
    chosen: dict[str, str] = {}
    for name, module in modules.items():
        kind = unit_kind(module)
        if kind in ("linear", "conv1d") and name not in heads:
            chosen[name] = kind
    for pattern in include:
        matches = [n for n in modules if n and (n == pattern or fnmatch.fnmatchcase(n, pattern))]
        if not matches:
            raise BitallocError(f"--include {pattern!r} matches no module of this model: use names from model.named_modules()")
        for name in matches:
            kind = unit_kind(modules[name])
            if kind is None:
                if any(unit_kind(m) for m in modules[name].modules()):
                    continue  # a container: its layers are matched by their own names
                raise BitallocError(
                    f"--include {name!r} is a {type(modules[name]).__name__}, which bitalloc cannot quantize: "
                    "include only Linear, Conv1D or Embedding layers")
            chosen[name] = kind
    units = []
    for name, module in modules.items():
        if name not in chosen:
            continue
        kind = chosen[name]
        w = weight_matrix(module, kind)
        if not torch.is_floating_point(w):
            raise BitallocError(f"layer {name!r} holds {w.dtype} weights, not floats: it is quantized already")
        units.append(Unit(name, (int(w.shape[0]), int(w.shape[1])), kind, _fused_group(name, chosen) if fuse else None))
    if not units:
        raise BitallocError("the model has no Linear layers to quantize: pass a model with nn.Linear/Conv1D layers")
    return units


def _fused_group(name: str, chosen: dict[str, str]) -> str | None:
    parent, _, leaf = name.rpartition(".")
    for tag, siblings in FUSED_SIBLINGS:
        if leaf in siblings and sum(f"{parent}.{s}" in chosen for s in siblings) > 1:
            return f"{parent}.{tag}" if parent else tag
    return None


def find_blocks(model: nn.Module, units: list[Unit]) -> list[tuple[str, nn.Module]]:
    """The repeated blocks (decoder layers) that hold the units: the ModuleList covering the most units."""
    best: list[tuple[str, nn.Module]] = []
    best_count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{name}."
            count = sum(u.name.startswith(prefix) for u in units)
            if count > best_count:
                best_count = count
                best = [(f"{name}.{i}", child) for i, child in enumerate(module)]
    return best


def check_finite(model: nn.Module, units: list[Unit]) -> None:
    modules = dict(model.named_modules())
    for unit in units:
        w = modules[unit.name].weight
        if not torch.isfinite(w).all():
            raise BitallocError(f"layer {unit.name!r} has NaN or Inf weights: fix or re-export the checkpoint first")
