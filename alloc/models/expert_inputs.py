"""What each MoE expert reads: XᵀX per expert matrix, for GPTQ (``expert_hessians``); Σx² per input column,
for llama.cpp's importance weighting and imatrix file (``expert_energy``).

Experts kept in 3-D parameters are not modules, so forward hooks cannot see their inputs. While
``expert_hessians`` is active, each experts module runs its eager forward (the per-expert loop that
transformers' other implementations (grouped_mm, …) must match), and every product of an input with one
expert's slice of a tracked parameter adds xᵀx to that expert's H (per-layer units: to the stack's H, the
sum over its experts). Two forms are caught: ``F.linear(x, W)`` with W (out, in) (Mixtral, Qwen3-MoE, OLMoE,
…) and ``x @ W`` with W (in, out), GPT-OSS's transposed experts. Experts that no calibration token reached
get no H.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from ..units import EXPERT_KINDS, Unit


def expert_hessians(modules: dict, units: list[Unit], H: dict[str, torch.Tensor]):
    """While active, every expert unit's H gains xᵀx of what it reads (see the module docstring)."""
    def add(name, expert, x):
        H[name] = H.get(name, 0) + x.T @ x
    return expert_inputs(modules, units, add)


def expert_energy(modules: dict, units: list[Unit], sums: dict, counts: dict):
    """While active, ``sums[(stack parameter, expert)]`` gains Σx² per input column of what that expert reads
    and ``counts[...]`` its rows: the diagonal alone, per expert even for per-layer units (llama.cpp's imatrix
    keeps one row per expert)."""
    def add(name, expert, x):
        key = (name, expert)
        sums[key] = sums.get(key, 0) + x.square().sum(0).double().cpu()
        counts[key] = counts.get(key, 0) + x.shape[0]
    stacks = [Unit(f"{u.module_name}.{u.param}", u.shape, u.kind, owner=u.module_name, param=u.param, expert=None)
              for u in {(u.module_name, u.param): u for u in units if u.kind in EXPERT_KINDS}.values()]
    return expert_inputs(modules, stacks, add)


@contextlib.contextmanager
def expert_inputs(modules: dict, units: list[Unit], add):
    """While active, ``add(unit name, expert index, x)`` for every product of an input x (rows, in; float32)
    with a slice of one of ``units``' expert parameters (the eager per-expert loop, see the module docstring)."""
    units = [u for u in units if u.kind in EXPERT_KINDS]
    if not units:
        yield
        return
    by_param: dict[int, tuple[torch.Tensor, dict]] = {}
    for u in units:
        p = getattr(modules[u.module_name], u.param)
        by_param.setdefault(id(p), (p, {}))[1][u.expert] = u.name

    def record(x, weight) -> None:
        """Tell ``add`` about x when ``weight`` is one expert's slice of a tracked parameter."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not isinstance(x, torch.Tensor):
            return
        for p, names in by_param.values():
            base, size = p.data_ptr(), p[0].numel() * p.element_size()
            if base <= weight.data_ptr() < base + p.shape[0] * size:
                expert = (weight.data_ptr() - base) // size
                name = names.get(expert, names.get(None))
                if name is not None:
                    add(name, expert, x.detach().reshape(-1, x.shape[-1]).float())
                return

    original_linear, original_matmul = F.linear, torch.Tensor.__matmul__

    def linear(x, weight, bias=None):
        record(x, weight)
        return original_linear(x, weight, bias)

    def matmul(x, other):
        record(x, other)
        return original_matmul(x, other)

    owners = {u.module_name for u in units}
    saved = {}
    for name in owners:            # the eager loop: one product per expert slice
        module = modules[name]
        eager = getattr(type(module).forward, "__wrapped__", None)
        if eager is not None:
            saved[name] = module.__dict__.get("forward")
            module.forward = types.MethodType(eager, module)
    F.linear, torch.Tensor.__matmul__ = linear, matmul
    try:
        yield
    finally:
        F.linear, torch.Tensor.__matmul__ = original_linear, original_matmul
        for name, previous in saved.items():
            if previous is None:
                del modules[name].forward
            else:
                modules[name].forward = previous
