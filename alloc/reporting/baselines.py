"""Baselines users know: the tensor-type mixes ``llama-quantize`` picks for its Q2_K, Q3_K_S, Q3_K_M and
Q4_K_M presets, as plans over a sensitivity table's units, so they can be scored beside bitalloc's plans.

The rules restate, in our own words, what llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp) does
for these four presets on non-Falcon decoders (``i`` is the layer, ``n`` the number of layers; integer
division; "more bits" layers are i < n/8, i ≥ 7n/8 and every third layer between, (i − n/8) mod 3 = 2):

    preset   default  attn_v                              ffn_down                        attn_output
    Q2_K     q2_K     q4_K if n_head/n_kv ≥ 4, else q3_K   q3_K                            q3_K
    Q3_K_S   q3_K     q3_K                                q3_K                            q3_K
    Q3_K_M   q3_K     q5_K for the first two, then q4_K    q5_K if i < n/16, else q4_K     q4_K
    Q4_K_M   q4_K     q6_K on "more bits" layers, q4_K    q6_K on "more bits" layers      q4_K

Models with 8 experts take q8_0 for attn_v and attn_k and q5_K for attn_output; MoE expert stacks follow the
ffn rules of their projection; the output head (``lm_head``, when planned) takes q6_K, and so does a token
embedding the head is tied to (planned with --size; Gemma). Units llama.cpp has no name for take the preset's
default type.

Each ggml type becomes the option with the nearest code width (q2_K → 2, q3_K → 3, q4_K → 4, q5_K → 5,
q6_K → 6, q8_0 → 8; ties go to the wider option: with {2, 3, 4, 8}, q5_K → 4 and q6_K → 8), at the
table's group size. The plans are thus bitalloc's own storage of llama.cpp's *choice of widths*, scored with
the same quantizer as every other plan: they measure how well llama.cpp allocates bits, not its K-quant
formats (whose super-block scales differ; ``bitalloc export --to llama.cpp`` gives their true sizes).
"""
from __future__ import annotations

import re

from ..errors import BitallocError
from ..export import gguf_names
from ..plan import BitPlan
from ..units import EXPERT_KINDS

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
GGML_WIDTH = {"q2_K": 2, "q3_K": 3, "q4_K": 4, "q5_K": 5, "q6_K": 6, "q8_0": 8}
DEFAULT_TYPE = {"Q2_K": "q2_K", "Q3_K_S": "q3_K", "Q3_K_M": "q3_K", "Q4_K_M": "q4_K"}


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's "use more bits" layers: the first and last eighth, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def ggml_type(preset: str, role: str, i: int, n: int, *, n_gqa: float, n_expert: int, i_v: int) -> str:
    """The ggml type llama.cpp's ``preset`` gives the tensor ``role`` (attn_v, ffn_down, …) of layer ``i``
    of ``n``; ``i_v`` counts the attn_v tensors before this one."""
    base = DEFAULT_TYPE[preset]
    if role == "output":
        return "q6_K"
    if role == "attn_v":
        if preset == "Q2_K":
            t = "q4_K" if n_gqa >= 4 else "q3_K"
        elif preset == "Q3_K_M":
            t = "q5_K" if i_v < 2 else "q4_K"
        elif preset == "Q4_K_M" and more_bits(i_v, n):
            t = "q6_K"
        else:
            t = base
        return "q8_0" if n_expert == 8 else t
    if role == "attn_k":
        return "q8_0" if n_expert == 8 else base
    if role.startswith("ffn_down"):
        if preset == "Q2_K":
            return "q3_K"
        if preset == "Q3_K_M":
            return "q5_K" if i < n // 16 else "q4_K"
        if preset == "Q4_K_M" and more_bits(i, n):
            return "q6_K"
        return base
    if role == "attn_output":
        if n_expert == 8:
            return "q5_K"
        return {"Q2_K": "q3_K", "Q3_K_M": "q4_K"}.get(preset, base)
    return base


def _nearest_option(options, bits: int, group_size: int):
    """The option nearest in code width (ties: the wider), preferring ``group_size``."""
    widths = sorted({o.bits for o in options})
    best = min(widths, key=lambda w: (abs(w - bits), -w))
    same = [o for o in options if o.bits == best]
    return min(same, key=lambda o: (abs(o.group_size - group_size), o.symmetric))


def _geometry(table, config) -> tuple[float, int, int]:
    """(n_head / n_kv_head, number of experts, number of layers) from the config, else from the units."""
    layers = {int(m.group(1)) for u in table.units if (m := re.search(r"\.layers\.(\d+)\.", u.name))}
    n_layers = max(layers) + 1 if layers else 1
    n_expert = max([u.expert + 1 for u in table.units if u.kind in EXPERT_KINDS and u.expert is not None] or [0])
    if config is not None:
        heads = getattr(config, "num_attention_heads", None)
        kv = getattr(config, "num_key_value_heads", None) or heads
        n_gqa = heads / kv if heads and kv else 1.0
        n_expert = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or n_expert
        return n_gqa, int(n_expert or 0), int(getattr(config, "num_hidden_layers", n_layers) or n_layers)
    shapes = {u.name.rsplit(".", 1)[-1]: u.shape[0] for u in table.units if ".layers.0." in u.name}
    n_gqa = shapes["q_proj"] / shapes["k_proj"] if {"q_proj", "k_proj"} <= shapes.keys() else 1.0
    return n_gqa, n_expert, n_layers


def llama_cpp_plan(preset: str, table, config=None) -> BitPlan:
    """The plan llama.cpp's ``preset`` (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M) amounts to on ``table``'s units."""
    if preset not in PRESETS:
        raise BitallocError(f"unknown llama.cpp preset {preset!r}: choose one of {', '.join(PRESETS)}")
    n_gqa, n_expert, n_layers = _geometry(table, config)
    group = max(set(o.group_size for o in table.options), key=[o.group_size for o in table.options].count)
    specs, i_v = [], 0
    # a token embedding the output head reads too (tied) takes the head's type in llama.cpp; with --size an
    # untied head is a unit of its own, so no head among the units means tied unless the config says not
    has_head = any(gguf_names(u.name) == ["output"] for u in table.units)
    tied = not has_head and bool(getattr(config, "tie_word_embeddings", True))
    for u in table.units:
        names = gguf_names(u.name)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", names[0]) if names else None
        head = names == ["output"] or (names == ["token_embd"] and tied)
        role, i = (m.group(2), int(m.group(1))) if m else ("output" if head else "other", 0)
        t = ggml_type(preset, role, i, n_layers, n_gqa=n_gqa, n_expert=n_expert, i_v=i_v)
        i_v += role == "attn_v"
        specs.append(_nearest_option(table.options, GGML_WIDTH[t], group))
    plan = BitPlan.from_choice(table.units, specs, budget_bits=None, solver=f"llama.cpp {preset}",
                               probe=table.probe, model=table.meta.get("model", {}), extra=table.plan_extra())
    idx = {o: j for j, o in enumerate(table.options)}
    plan.costs = {u.name: float(table.cost[k, idx[s]]) for k, (u, s) in enumerate(zip(table.units, specs))}
    plan.objective = sum(plan.costs.values())
    return plan


def baseline_plans(kind: str, table, config=None) -> list[tuple[str, BitPlan]]:
    """[(preset, plan)] for ``--baselines kind`` (only "llama.cpp" so far)."""
    if kind != "llama.cpp":
        raise BitallocError(f"unknown baselines {kind!r}: choose llama.cpp")
    return [(p, llama_cpp_plan(p, table, config)) for p in PRESETS]
