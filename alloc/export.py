"""Plan exports: the same widths in other tools' configuration formats.

    gptqmodel           QuantizeConfig JSON with a ``dynamic`` map: one start-anchored exact-name regex per
                        layer that differs from the default (``+:`` override), ``-:`` for layers kept in fp16
    llama.cpp           a ``--tensor-type-file`` for llama-quantize: ``PATTERN=TYPE`` lines on GGUF tensor
                        names (blk.N.attn_q, ffn_down, ...) with ggml types (q2_K ... q8_0)
    compressed-tensors  a ``quantization_config`` (config_groups with exact-name targets, ignore, weights args)

Widths a target cannot hold are mapped up to the nearest width it can, with a warning that names the
layers and the plan's resulting true bits per weight.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter

from .errors import BitallocError, BitallocWarning, few
from .options import QuantSpec
from .plan import BitPlan

FORMATS = ("gptqmodel", "llama.cpp", "compressed-tensors")

GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 5: "q5_K", 6: "q6_K", 8: "q8_0", 16: "f16"}
GGML_BPW = {"q2_K": 2.625, "q3_K": 3.4375, "q4_K": 4.5, "q5_K": 5.5, "q6_K": 6.5625, "q8_0": 8.5, "f16": 16.0}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}
GPTQMODEL_BITS = (2, 3, 4, 8)
GGUF_EXPERT_NAMES = {"gate_up_proj": ("ffn_gate_exps", "ffn_up_exps"), "gate_proj": ("ffn_gate_exps",),
                     "up_proj": ("ffn_up_exps",), "down_proj": ("ffn_down_exps",)}
GGUF_SHARED_NAMES = {"gate_proj": "ffn_gate_shexp", "up_proj": "ffn_up_shexp", "down_proj": "ffn_down_shexp"}
EXPERT_RE = re.compile(r"(?P<stack>.+\.experts)(?:\.(?P<e>\d+))?\.(?P<proj>gate_up_proj|gate_proj|up_proj|down_proj)")


def linear_names(name: str) -> list[str]:
    """The Linear-module names GPTQModel and llm-compressor give a bitalloc unit: a fused expert matrix
    ``experts.3.gate_up_proj`` is their ``experts.3.gate_proj`` and ``experts.3.up_proj``; a per-layer stack
    ``experts.down_proj`` is every ``experts.N.down_proj``, written as a regex (``re:`` prefix)."""
    m = EXPERT_RE.fullmatch(name)
    if not m:
        return [name]
    projs = ("gate_proj", "up_proj") if m["proj"] == "gate_up_proj" else (m["proj"],)
    if m["e"] is not None:
        return [f"{m['stack']}.{m['e']}.{p}" for p in projs]
    return ["re:" + re.escape(m["stack"]) + r"\.\d+\.(" + "|".join(projs) + ")"]


def _regex(name: str) -> str:
    return name[3:] if name.startswith("re:") else re.escape(name)


def _map_up(plan: BitPlan, supported: tuple[int, ...], target: str) -> dict[str, QuantSpec]:
    """Each layer's spec with its bits raised to the nearest width ``target`` supports (warn if any)."""
    out, moved = {}, []
    for name, spec in plan.layers.items():
        if spec.is_float or spec.bits in supported:
            out[name] = spec
            continue
        up = min((b for b in supported if b > spec.bits), default=16)
        out[name] = QuantSpec(up, spec.group_size, spec.symmetric) if up != 16 else QuantSpec(16)
        moved.append(f"{name} {spec.bits}->{up}")
    if moved:
        bits = sum(out[n].size_bits(tuple(plan.shapes[n])) for n in out)
        warnings.warn(f"{target} cannot store every width of the plan; mapped up {len(moved)} layer(s) "
                      f"({few(moved, 6)}): true bpw becomes "
                      f"{bits / plan.n_params:.4f} (plan {plan.true_bpw:.4f})", BitallocWarning, stacklevel=3)
    return out


def round_up_rows(plan: BitPlan, names, *, exact: bool, one_per: str) -> list[str]:
    """The row-plan layers among ``names``: a format with one width per layer (``one_per`` says so, e.g. "GGUF
    stores one type per tensor") stores each at its widest row, which is the plan's own spec for that layer
    (BitPlan keeps it so); ``exact`` refuses instead. Warns once; returns the layers rounded up."""
    rows = [n for n in names if n in plan.row_bits]
    if rows and exact:
        widths = sorted(set(plan.row_bits[rows[0]].tolist()))
        raise BitallocError(f"{rows[0]} mixes widths {widths} across rows; {one_per}: plan per layer "
                            "(--granularity layer) or drop --exact to round rows up")
    if rows:
        warnings.warn(f"{len(rows)} layer(s) mix widths across rows ({few(rows)}); {one_per}, so each takes its "
                      "widest row's (the output is larger than the plan)", BitallocWarning, stacklevel=3)
    return rows


def _spec_args(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.symmetric}


def split_fused_groups(specs: dict[str, QuantSpec]) -> list[str]:
    """Sibling groups (q/k/v, gate/up of one block) whose members the plan gives different formats."""
    from .units import FUSED_SIBLINGS
    split = []
    parents = list(dict.fromkeys(n.rpartition(".")[0] for n in specs))     # in plan (layer) order
    for parent in parents:
        for tag, siblings in FUSED_SIBLINGS:
            members = [specs[f"{parent}.{s}"] for s in siblings if f"{parent}.{s}" in specs]
            if len(members) > 1 and len(set(members)) > 1:
                split.append(f"{parent}.{tag}")
    return split


def to_gptqmodel(plan: BitPlan) -> dict:
    specs = _map_up(plan, GPTQMODEL_BITS, "gptqmodel")
    split = split_fused_groups(specs)
    if split:
        warnings.warn(f"{len(split)} q/k/v or gate/up group(s) mix widths ({few(split)}): vLLM fuses these projections and cannot load such a "
                      "checkpoint; allocate with --fuse to give each group one width", BitallocWarning, stacklevel=3)
    return gptqmodel_config({target: spec for name, spec in specs.items() for target in linear_names(name)})


def gptqmodel_config(specs: dict[str, QuantSpec]) -> dict:
    """GPTQModel's quantization_config for {module name: spec}: the most common format as the defaults, the
    others (and ``-:`` skips for 16-bit modules) as ``dynamic`` regexes on the names (``re:`` names as they are)."""
    quantized = [s for s in specs.values() if not s.is_float]
    if not quantized:
        raise BitallocError("the plan quantizes no layer: nothing to export")
    default = Counter(quantized).most_common(1)[0][0]
    dynamic: dict[str, dict] = {}
    for name, spec in specs.items():
        pattern = "^" + _regex(name) + "$"
        if spec.is_float:
            dynamic["-:" + pattern] = {}
        elif spec != default:
            dynamic["+:" + pattern] = _spec_args(spec)
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "desc_act": False, **_spec_args(default),
            "dynamic": dynamic}


def gptqmodel_resolve(config: dict, name: str) -> dict | None:
    """What GPTQModel does with one module name: the first dynamic key whose regex matches wins;
    ``-:`` skips the module (None), ``+:`` (or no prefix) overrides the defaults."""
    base = {k: config[k] for k in ("bits", "group_size", "sym")}
    for key, override in config.get("dynamic", {}).items():
        sign, pattern = ("-", key[2:]) if key.startswith("-:") else ("+", key[2:] if key.startswith("+:") else key)
        if re.match(pattern, name):
            return None if sign == "-" else {**base, **override}
    return base


def gguf_names(hf_name: str) -> list[str]:
    """The GGUF tensors a unit is stored in ([] when unknown). MoE experts live in merged 3-D tensors
    (``blk.N.ffn_{gate,up,down}_exps``), shared experts in ``ffn_*_shexp``."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in GGUF_NAMES:
        return [f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}"]
    if m and (e := EXPERT_RE.fullmatch(m.group(2))) and e["stack"] == "mlp.experts":
        return [f"blk.{m.group(1)}.{t}" for t in GGUF_EXPERT_NAMES[e["proj"]]]
    if m and (s := re.fullmatch(r"mlp\.shared_experts?\.(gate_proj|up_proj|down_proj)", m.group(2))):
        return [f"blk.{m.group(1)}.{GGUF_SHARED_NAMES[s.group(1)]}"]
    head = {"lm_head": "output", "model.embed_tokens": "token_embd"}.get(hf_name)
    return [head] if head else []


def gguf_name(hf_name: str) -> str | None:
    """The one GGUF tensor of a dense unit (None when unknown)."""
    names = gguf_names(hf_name)
    return names[0] if len(names) == 1 else None


def _merge_experts(plan: BitPlan, specs: dict[str, QuantSpec]) -> dict[str, QuantSpec]:
    """GGUF stores all experts of a projection in one tensor of one type: each expert takes its stack's
    widest width (warn with the stacks and the new true bpw)."""
    widest: dict[str, QuantSpec] = {}
    for name, spec in specs.items():
        for g in gguf_names(name):
            if g.endswith("_exps") and (g not in widest or spec.bits > widest[g].bits):
                widest[g] = spec
    out, moved = dict(specs), []
    for name, spec in specs.items():
        gs = [g for g in gguf_names(name) if g.endswith("_exps")]
        if gs and max((widest[g] for g in gs), key=lambda s: s.bits) != spec:
            out[name] = max((widest[g] for g in gs), key=lambda s: s.bits)
            moved.append(name)
    if moved:
        bits = sum(out[n].size_bits(tuple(plan.shapes[n])) for n in out)
        stacks = sorted({g for n in moved for g in gguf_names(n)})
        warnings.warn(f"llama.cpp stores the experts of a layer in one tensor: {len(moved)} expert unit(s) raised to "
                      f"their stack's widest width ({few(stacks, 4)}): true "
                      f"bpw becomes {bits / plan.n_params:.4f} (plan {plan.true_bpw:.4f}); allocate with "
                      "--experts per-layer to plan one width per stack", BitallocWarning, stacklevel=3)
    return out


def to_llama_cpp(plan: BitPlan) -> str:
    unmapped = [n for n in plan.layers if not gguf_names(n)]
    if unmapped:
        raise BitallocError(f"{len(unmapped)} layer(s) have no GGUF tensor name ({', '.join(unmapped[:5])}): the "
                            "llama.cpp export knows Llama-style names (model.layers.N.self_attn.q_proj, mlp.*, "
                            "mlp.experts.*)")
    specs = _merge_experts(plan, _map_up(plan, tuple(b for b in GGML_TYPES if b != 16), "llama.cpp"))
    lines = {}
    for name, spec in specs.items():
        ggml = GGML_TYPES[16 if spec.is_float else spec.bits]
        for g in gguf_names(name):
            lines[g] = ggml
    lines = list(lines.items())
    # exact names only, so any order is unambiguous; most specific (longest) first by convention
    lines.sort(key=lambda kv: (-len(kv[0]), kv[0]))
    bits = sum(GGML_BPW[t] * plan.shapes[n][0] * plan.shapes[n][1]
               for n, t in zip(specs, (GGML_TYPES[16 if s.is_float else s.bits] for s in specs.values())))
    header = (f"# bitalloc plan ({plan.solver}, budget {plan.budget_bits}) as llama-quantize --tensor-type-file\n"
              f"# ggml K-quants fix their own block layout: these types take {bits / plan.n_params:.4f} bits/weight\n")
    return header + "".join(f"{re.escape(g)}\\.weight={t}\n" for g, t in lines)


def to_compressed_tensors(plan: BitPlan) -> dict:
    groups: dict[QuantSpec, list[str]] = {}
    ignore = ["lm_head"] if "lm_head" not in plan.layers else []
    for name, spec in plan.layers.items():
        if spec.is_float:
            ignore += linear_names(name)
        else:
            groups.setdefault(spec, []).extend(linear_names(name))
    config_groups = {}
    for k, (spec, names) in enumerate(sorted(groups.items(), key=lambda kv: (kv[0].bits, kv[0].group_size))):
        per_channel = spec.group_size == -1
        config_groups[f"group_{k}"] = {
            "targets": names,
            "weights": {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
                        "strategy": "channel" if per_channel else "group",
                        "group_size": None if per_channel else spec.group_size},
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": config_groups,
            "ignore": ignore}


def per_layer(plan: BitPlan, *, exact: bool = False) -> BitPlan:
    """A row plan as the per-layer plan other tools can express: each layer at its widest row (warn with the
    layers and the new true bpw), or refused when ``exact``."""
    if not plan.row_bits:
        return plan
    mixed = list(plan.row_bits)
    if exact:
        raise BitallocError(f"the plan gives {len(mixed)} layer(s) rows of several widths ({few(mixed)}), "
                            "which GPTQModel, llama.cpp and compressed-tensors "
                            "cannot express: drop --exact to round each layer up to its widest row")
    import dataclasses
    layer = dataclasses.replace(plan, layers=dict(plan.layers), row_bits={}, costs={})
    warnings.warn(f"other tools hold one width per layer: {len(mixed)} layer(s) with mixed rows rounded up to their "
                  f"widest row ({few(mixed)}): true bpw becomes "
                  f"{layer.true_bpw:.4f} (plan {plan.true_bpw:.4f}); --exact refuses instead", BitallocWarning,
                  stacklevel=3)
    return layer


def export(plan: BitPlan, fmt: str, *, exact: bool = False) -> str:
    """``plan`` as ``fmt``'s config. Row plans are rounded up per layer (``exact``: refused)."""
    if fmt not in FORMATS:
        raise BitallocError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    plan = per_layer(plan, exact=exact)
    if fmt == "gptqmodel":
        return json.dumps(to_gptqmodel(plan), indent=2) + "\n"
    if fmt == "llama.cpp":
        return to_llama_cpp(plan)
    if fmt == "compressed-tensors":
        return json.dumps({"quantization_config": to_compressed_tensors(plan)}, indent=2) + "\n"
    raise BitallocError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
