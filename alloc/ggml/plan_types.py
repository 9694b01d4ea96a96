"""Which ggml type stores each planned unit (``apply --format gguf``).

A plan made with ``--options ggml`` names each unit's type already (QuantSpec.ggml, with the fallback its
rows need). Any other plan's width maps to the K-quant of that width (W2 -> Q2_K, W3 -> Q3_K, W4 -> Q4_K, W5 -> Q5_K, W6 -> Q6_K,
W8 -> Q8_0, 16 -> F16). K-quants need rows that are a multiple of 256 weights; on other rows the type falls
back as llama.cpp's own quantizer does (Q2_K/Q3_K -> a 4.5-bit type with 32-weight blocks, here Q4_0; Q4_K
-> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0): Gemma-3-270M's 640-wide inputs take the fallback. A row plan's unit
takes its widest row's type (GGUF stores one type per tensor); ``exact`` refuses instead.
"""
from __future__ import annotations

import warnings
from collections import Counter

from ..errors import BitallocError, BitallocWarning, few
from ..plan import BitPlan
from ..units import EXPERT_KINDS
from .types import BY_BITS, FALLBACK, TYPES


def ggml_type(bits: int, in_features: int) -> str:
    """The ggml type of a ``bits``-wide unit whose rows hold ``in_features`` weights ("F16" for 16 bits)."""
    if bits == 16:
        return "F16"
    name = BY_BITS.get(bits)
    if name is None:
        raise BitallocError(f"{bits}-bit weights have no ggml type: plan with widths {sorted(BY_BITS)} (or 16)")
    if not TYPES[name].fits(in_features):
        name = FALLBACK[name]
    if not TYPES[name].fits(in_features):
        raise BitallocError(f"rows of {in_features} weights fit no ggml block (32 or 256): keep this layer at 16 bits")
    return name


def plan_types(plan: BitPlan, units, *, exact: bool = False) -> dict[str, str]:
    """{unit name: ggml type name} for every planned unit; warns once about fallbacks and rounded-up rows."""
    from ..export import round_up_rows
    round_up_rows(plan, [u.name for u in units], exact=exact, one_per="GGUF stores one type per tensor")
    out, fell = {}, []
    for u in units:
        spec = plan.layers[u.name]                   # a row plan's layer: its widest row (round_up_rows)
        if spec.ggml:
            out[u.name] = spec.ggml_for(u.shape[1])
            continue
        out[u.name] = ggml_type(spec.bits, u.shape[1])
        if not spec.is_float and out[u.name] != BY_BITS[spec.bits]:
            fell.append((u.name, f"{BY_BITS[spec.bits]}->{out[u.name]}"))
    _one_per_stack(out, units, exact)
    if fell:
        kinds = Counter(k for _, k in fell)
        warnings.warn(f"{len(fell)} unit(s) have rows that are not a multiple of 256 weights and take llama.cpp's "
                      f"fallback types ({', '.join(f'{k} ×{v}' for k, v in sorted(kinds.items()))}): "
                      f"{few([n for n, _ in fell])}", BitallocWarning, stacklevel=3)
    return out


def _one_per_stack(types: dict[str, str], units, exact: bool) -> None:
    """In place: the experts of one stack (a 3-D parameter, one ggml tensor per projection) all take the
    widest type any of them has; warns, or refuses with ``exact``."""
    stacks: dict[tuple, list[str]] = {}
    for u in units:
        if u.kind in EXPERT_KINDS and u.expert is not None:
            stacks.setdefault((u.module_name, u.param), []).append(u.name)
    raised = []
    for names in stacks.values():
        widest = max((types[n] for n in names), key=lambda t: 16 if t == "F16" else TYPES[t].bpw)
        moved = [n for n in names if types[n] != widest]
        if moved and exact:
            raise BitallocError(f"{len(moved)} expert(s) of {names[0].rsplit('.', 2)[0]} differ from their stack's "
                                f"{widest}: a GGUF file stores one type per expert stack; plan with --experts per-layer")
        raised += moved
        types.update({n: widest for n in names})
    if raised:
        warnings.warn(f"{len(raised)} expert(s) take their stack's widest type (GGUF stores one type per expert stack; "
                      f"plan with --experts per-layer to choose it): {few(raised)}", BitallocWarning, stacklevel=4)


def types_bits(types: dict[str, str], units) -> float:
    """Bits per weight of the planned units stored in ``types``."""
    shapes = {u.name: u.shape for u in units}
    n = sum(shapes[k][0] * shapes[k][1] for k in types)
    bits = sum(shapes[k][0] * shapes[k][1] * (16 if t == "F16" else TYPES[t].bpw) for k, t in types.items())
    return bits / max(n, 1)
