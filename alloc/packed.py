"""Stage 4 of the flow: store a plan for real. ``apply`` swaps every planned layer for a packed QuantLinear;
``save``/``load`` write and read a packed model as safetensors plus the plan JSON (no pickle anywhere).

A packed checkpoint folder holds
    model.safetensors   every tensor; header metadata {"bitalloc_format": "1", "dtype": ...}
    plan.json           the BitPlan the tensors were packed from
    config.json         the model's Hugging Face config (and the tokenizer files, when known)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError
from .files import check_parent
from .plan import BitPlan
from .quantize_model import quantize_model
from .units import find_units

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PLAN = "plan.json"


def planned_units(model: nn.Module, plan: BitPlan):
    """The model's units that the plan names (default units plus any the plan includes, e.g. lm_head)."""
    names = {n for n, _ in model.named_modules()}
    extra = tuple(n for n in plan.layers if n in names)
    units = find_units(model, include=extra, fuse=False)
    units = [u for u in units if u.name in plan.layers]
    plan.check_units(units)
    return units


def apply(model: nn.Module, plan: BitPlan, *, quantizer: str = "rtn", calibration: torch.Tensor | None = None,
          progress: bool = True) -> nn.Module:
    """Quantize ``model`` by ``plan`` and replace each planned layer by a packed QuantLinear, in place.

    Layers planned at 16 bits stay ordinary layers with fp16-rounded weights. Returns the model, which
    carries the plan as ``model.bitalloc_plan``."""
    units = planned_units(model, plan)
    embeddings = [u.name for u in units if u.kind == "embedding" and not plan.layers[u.name].is_float]
    if embeddings:
        raise BitallocError(f"apply packs Linear layers only; the plan quantizes embedding(s) {', '.join(embeddings)}: "
                            "allocate without --include for embeddings, or keep them at 16 bits")
    quantized = quantize_model(model, units, plan, quantizer=quantizer, calibration=calibration, progress=progress)
    from .kernels.qlinear import QuantLinear
    modules = dict(model.named_modules())
    for u in units:
        if u.name not in quantized:
            continue
        old = modules[u.name]
        new = QuantLinear.from_quantized(quantized[u.name], getattr(old, "bias", None))
        _set_module(model, u.name, new.to(old.weight.device))
    model.bitalloc_plan = plan
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def check_new_folder(path: str | os.PathLike) -> Path:
    """A checkpoint folder to create: its parent must exist and it must not hold anything yet."""
    out = check_parent(path)
    if out.exists() and any(out.iterdir()):
        raise BitallocError(f"{str(out)!r} exists and is not empty: choose a new folder")
    return out


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a packed model (see the module docstring). The folder appears whole or not at all."""
    from safetensors.torch import save_model
    plan = getattr(model, "bitalloc_plan", None)
    if plan is None:
        raise BitallocError("this model is not packed: call bitalloc.apply(model, plan) first")
    out = check_new_folder(out_dir)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"bitalloc_format": str(FORMAT_VERSION),
                                                        "dtype": str(dtype).removeprefix("torch.")})
        plan.save(tmp / PLAN)
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)            # mkdtemp makes 0700; give the folder the usual permissions
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: shape}) from a safetensors header, without reading the tensors."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    return meta, {k: tuple(v["shape"]) for k, v in header.items()}


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """A packed model from a folder written by :func:`save`, in a fresh process, outputs reproduced exactly."""
    import transformers
    from safetensors.torch import load_model as st_load

    from .kernels.qlinear import QuantLinear
    folder = Path(path)
    weights = folder / WEIGHTS
    if not weights.is_file() or not (folder / PLAN).is_file():
        raise BitallocError(f"{str(folder)!r} is not a packed bitalloc checkpoint (needs {WEIGHTS} and {PLAN}): "
                            "write one with `bitalloc apply`")
    meta, shapes = _read_header(weights)
    version = meta.get("bitalloc_format")
    if version is None:
        raise BitallocError(f"{weights} has no bitalloc_format in its metadata: it was not written by bitalloc")
    if int(version) > FORMAT_VERSION:
        raise BitallocError(f"{weights} is packed format {version}, newer than this bitalloc reads ({FORMAT_VERSION}): "
                            "upgrade bitalloc")
    plan = BitPlan.load(folder / PLAN)
    dtype = getattr(torch, meta.get("dtype", "float32"))
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = transformers.AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) \
        else transformers.AutoModel
    model = cls.from_config(config, dtype=dtype)
    units = planned_units(model, plan)
    modules = dict(model.named_modules())
    for u in units:
        spec = plan.layers[u.name]
        if spec.is_float:
            continue
        out_f, in_f = u.shape
        has_bias = getattr(modules[u.name], "bias", None) is not None
        q = QuantLinear(in_f, out_f, spec.bits, spec.group_size, spec.symmetric, has_bias, dtype)
        for name, t in q.state_dict().items():
            key = f"{u.name}.{name}"
            if shapes.get(key) != tuple(t.shape):
                raise BitallocError(f"checkpoint does not match its plan: {key} is {shapes.get(key, 'missing')}, "
                                    f"the plan's {spec.label()} needs {tuple(t.shape)}; re-run `bitalloc apply`")
        _set_module(model, u.name, q)
    try:
        st_load(model, str(weights), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise BitallocError(f"checkpoint tensors do not match the model built from its config: {first}") from None
    model.eval()
    model.bitalloc_plan = plan
    model.name_or_path = str(folder)
    if device is not None:
        model.to(device)
    return model


def checkpoint_report(model: nn.Module, folder: str | os.PathLike) -> dict:
    """Actual file size against the size the plan promises:
    true bpw x quantized params / 8 + bytes of every tensor that is not quantized."""
    plan: BitPlan = model.bitalloc_plan
    quantized = {n for n, s in plan.layers.items() if not s.is_float}
    q_params = sum(plan.shapes[n][0] * plan.shapes[n][1] for n in quantized)
    q_bits = sum(plan.layers[n].size_bits(tuple(plan.shapes[n])) for n in quantized)
    rest = 0
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in quantized and leaf in ("qweight", "scales", "qzeros"):
            continue
        rest += t.numel() * t.element_size()
    expected = q_bits / 8 + rest
    actual = (Path(folder) / WEIGHTS).stat().st_size
    return {"actual_bytes": actual, "expected_bytes": expected, "quantized_params": q_params,
            "true_bpw": q_bits / max(q_params, 1), "relative_diff": actual / expected - 1}
