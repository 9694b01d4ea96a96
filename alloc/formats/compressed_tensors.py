"""``apply --format compressed-tensors``: the plan as a compressed-tensors ``pack-quantized`` checkpoint,
the format vLLM and transformers (with the ``compressed-tensors`` package) load.

Each planned layer keeps bitalloc's own codes, scales and zeros (RTN or GPTQ, exactly what the fake-quantized
model computes with), written as the package defines them:

    <layer>.weight_packed       int32, the signed codes (code − 2^(b−1)) packed by the package's own
                                ``pack_to_int32`` (the installed version's layout: dense since 2026-06)
    <layer>.weight_scale        (out, groups) float32 (our scales are fp16 values; bf16 cannot hold them)
    <layer>.weight_zero_point   asymmetric formats: the signed zeros, packed along the output dimension
                                (transformers 5.25 cannot load these: save warns; --target transformers
                                plans symmetric formats)
    <layer>.weight_shape        int64 [out, in]

``quantization_config`` has one config group per (width, group size, symmetry) whose ``targets`` are the
layers' exact names on disk, and ``ignore`` lists the layers kept in 16 bits. MoE experts are written one
Linear per expert and projection under the names transformers saves them by (formats/disk.py), as
llm-compressor writes them. Row plans cannot be stored (a layer has
one scheme): each layer takes its widest row's width, or ``exact`` refuses.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..errors import BitallocError, BitallocWarning, few
from ..options import QuantSpec
from ..plan import BitPlan

from .folder import WEIGHTS

COMPRESSED_TENSORS = "compressed_tensors"      # the package whose helpers pack the codes (base install)


def storable_specs(plan: BitPlan, units, *, exact: bool) -> dict[str, QuantSpec]:
    """{unit: the spec it is stored in}: row-plan layers at their widest row (or refused with ``exact``)."""
    bad = [u.name for u in units if u.kind in ("expert_t", "embedding") or plan.layers[u.name].ggml]
    if bad:
        raise BitallocError(f"compressed-tensors output stores Linear layers in our formats; {len(bad)} planned unit(s) "
                            f"are embeddings, 3-D experts or ggml types ({few(bad)}): plan them out or use --format gguf")
    from ..export import round_up_rows
    round_up_rows(plan, [u.name for u in units], exact=exact, one_per="a compressed-tensors layer has one scheme")
    specs = {}
    for u in units:
        spec = plan.layers[u.name]                   # a row plan's layer: its widest row (round_up_rows)
        if not spec.is_float and spec.group_size != -1 and u.shape[1] % spec.group_size:
            raise BitallocError(f"{u.name} has {u.shape[1]} inputs, not a multiple of its group size "
                                f"{spec.group_size}: compressed-tensors groups must divide the rows")
        specs[u.name] = spec
    return specs


def scheme_args(spec: QuantSpec) -> dict:
    from compressed_tensors.quantization import QuantizationArgs
    strategy = "channel" if spec.group_size == -1 else "group"
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy,
                            group_size=None if spec.group_size == -1 else spec.group_size)
    return args.model_dump(mode="json")


def quantization_config(specs: dict[str, QuantSpec]) -> dict:
    import compressed_tensors
    groups: dict[QuantSpec, list[str]] = defaultdict(list)
    for name, spec in specs.items():
        if not spec.is_float:
            groups[spec].append(name)
    config_groups = {f"group_{i}": {"targets": sorted(names), "weights": scheme_args(spec),
                                    "input_activations": None, "output_activations": None}
                     for i, (spec, names) in enumerate(sorted(groups.items()))}
    ignore = [n for n, s in specs.items() if s.is_float] + ([] if "lm_head" in specs else ["lm_head"])
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": sorted(set(ignore)),
            "version": compressed_tensors.__version__ if hasattr(compressed_tensors, "__version__") else None}


def pack_layer(q, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Our QuantizedWeight as the package's tensors (see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    half = 2 ** (spec.bits - 1)
    out = {"weight_packed": pack_to_int32((q.codes - half).to(torch.int8), spec.bits),
           "weight_scale": q.scales.float().contiguous(),
           "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64)}
    if not spec.symmetric:
        out["weight_zero_point"] = pack_to_int32((q.zeros - half).to(torch.int8), spec.bits, packed_dim=0)
    return out


def stored_plan(plan: BitPlan, specs: dict[str, QuantSpec]) -> BitPlan:
    """The plan as the folder stores it: each layer in the spec it is written in."""
    return BitPlan({n: specs[n] for n in plan.layers}, dict(plan.shapes), plan.budget_bits, solver=plan.solver,
                   probe=plan.probe, model=plan.model, extra=plan.extra)


def save(model: nn.Module, plan: BitPlan, out_dir: str | os.PathLike, *, tokenizer=None, quantizer="rtn",
         calibration: torch.Tensor | None = None, exact: bool = False, force: bool = False, info: dict | None = None,
         progress: bool = True) -> dict:
    """Write ``model`` quantized by ``plan`` as a compressed-tensors folder ``out_dir`` (appears whole or not at
    all). The model's own weights are left as they are. Returns {"specs": {layer: spec}, "bytes": file size,
    "plan": the plan as stored (rows rounded up)}."""
    from ..checks import require
    from ..files import check_new_folder
    from ..units import planned_units
    from ..provenance import check_plan_model
    from .folder import checkpoint_tensors, warn_mixed_experts, write_folder
    require(COMPRESSED_TENSORS, None, "a compressed-tensors checkpoint", "compressed-tensors")   # before the work
    out = check_new_folder(out_dir)
    units = planned_units(model, plan)
    plan = check_plan_model(plan, model, units, info, force=force)
    specs = storable_specs(plan, units, exact=exact)
    asymmetric = sorted({str(specs[n]) for n in plan.layers if specs[n].bits < 16 and not specs[n].symmetric})
    if asymmetric:                                  # said before the work, in one line
        warnings.warn(BitallocWarning(
            f"compressed-tensors: {few(asymmetric)} have zero points, which transformers' from_pretrained cannot "
            "load (transformers 5.25 with compressed-tensors 0.20: packed zero points); vLLM and bitalloc's "
            "reader can. For a file transformers loads, allocate with --target transformers (symmetric)"))
    stored = stored_plan(plan, specs)
    tensors, modules = checkpoint_tensors(model, units, stored, lambda name, q: pack_layer(q, specs[name]),
                                          quantizer=quantizer, calibration=calibration, progress=progress)
    warn_mixed_experts(specs, units)
    size = write_folder(out, model, tensors, quantization_config({m: specs[u] for m, u in modules.items()}),
                        stored, tokenizer)
    return {"specs": specs, "bytes": size, "plan": stored}


def read(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    """The checkpoint as the compressed-tensors package reads it, and which reader: transformers'
    ``from_pretrained`` when every group is symmetric and every target is a Linear of the model; otherwise the
    package's own decompressor per layer (``PackedQuantizationCompressor.decompress``), its dense weights then
    loaded by ``from_pretrained`` (which merges per-expert weights into transformers 5's 3-D experts). With
    compressed-tensors 0.20 transformers cannot do either itself: it prepares unpacked zero-point placeholders
    the packed zero points do not fit, and it leaves per-expert targets unmatched ("Could not match"), the
    experts not loaded."""
    import tempfile

    import transformers
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file, save_file
    folder = Path(folder)
    transformers.logging.set_verbosity_error()
    config = json.loads((folder / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    targets = [t for g in groups.values() for t in g["targets"]]
    plain = transformers.AutoConfig.from_pretrained(str(folder))
    del plain.quantization_config                    # the plain model: the weights are decompressed here
    with torch.device("meta"):
        linears = {n for n, m in transformers.AutoModelForCausalLM.from_config(plain).named_modules()
                   if isinstance(m, nn.Linear)}
    if all(g["weights"]["symmetric"] for g in groups.values()) and set(targets) <= linears:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
        return model, "transformers from_pretrained"
    tensors = load_file(str(folder / WEIGHTS))
    for group in groups.values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for name in group["targets"]:
            local = {k.removeprefix(f"{name}."): tensors.pop(k) for k in
                     [f"{name}.{p}" for p in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")]
                     if k in tensors}
            tensors[f"{name}.weight"] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                  str(Path(tmp) / WEIGHTS), metadata={"format": "pt"})
        plain.save_pretrained(tmp)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, output_loading_info=True)
    bad = [k for k in info["missing_keys"] if not k.endswith("lm_head.weight")] + list(info["unexpected_keys"])
    if bad:
        raise BitallocError(f"{folder} does not match its config: {few(sorted(bad))} not loaded")
    return model.eval(), "compressed-tensors decompress"
