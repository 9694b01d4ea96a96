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
from .types import TYPES

BY_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


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
    if fell:
        kinds = Counter(k for _, k in fell)
        warnings.warn(f"{len(fell)} unit(s) have rows that are not a multiple of 256 weights and take llama.cpp's "
                      f"fallback types ({', '.join(f'{k} ×{v}' for k, v in sorted(kinds.items()))}): "
                      f"{few([n for n, _ in fell])}", BitallocWarning, stacklevel=3)
    return out


def types_bits(types: dict[str, str], units) -> float:
    """Bits per weight of the planned units stored in ``types``."""
    shapes = {u.name: u.shape for u in units}
    n = sum(shapes[k][0] * shapes[k][1] for k in types)
    bits = sum(shapes[k][0] * shapes[k][1] * (16 if t == "F16" else TYPES[t].bpw) for k, t in types.items())
    return bits / max(n, 1)
