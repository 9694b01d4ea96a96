"""Stage 4 of the flow: store a plan for real. ``apply`` swaps every planned layer for a packed QuantLinear;
``save``/``load`` write and read a packed model as safetensors plus the plan JSON (no pickle anywhere).

A packed checkpoint folder holds
    model.safetensors   every tensor; header metadata {"bitalloc_format": "1", "dtype": ...}
    plan.json           the BitPlan the tensors were packed from
    config.json         the model's Hugging Face config (and the tokenizer files, when known)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError, few
from .plan import BitPlan
from .quantize_model import quantize_model
from .files import check_new_folder
from .formats.folder import in_source_dtype as _in_source_dtype
from .units import EXPERT_KINDS, planned_units, unit_weight

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
PLAN = "plan.json"


def _attach_experts(model: nn.Module, units, make_part) -> None:
    """Each 3-D expert parameter with planned experts -> QuantExperts (kernels/qexperts.py) whose parts,
    in expert order, are ``make_part(unit, modules)``."""
    from .kernels.qexperts import QuantExperts, attach
    modules = dict(model.named_modules())
    stacks: dict[tuple[str, str], list] = {}
    for u in units:
        if u.kind in EXPERT_KINDS:
            stacks.setdefault((u.module_name, u.param), []).append(u)
    for (owner, param), members in stacks.items():
        p = getattr(modules[owner], param)
        members.sort(key=lambda u: -1 if u.expert is None else u.expert)
        if len(members) != (1 if members[0].expert is None else p.shape[0]):
            raise BitallocError(f"the plan covers {len(members)} of the {p.shape[0]} experts in {owner}.{param}: "
                                "plan every expert of a layer (or none)")
        parts = [make_part(u, modules) for u in members]
        attach(modules[owner], param, QuantExperts(parts, tuple(p.shape), members[0].kind == "expert_t", p.dtype))


def _pack_experts(model: nn.Module, units, packed: dict) -> None:
    from .kernels.qexperts import FloatExpert

    def part(u, modules):
        if u.name in packed:
            return packed.pop(u.name)
        kept = FloatExpert(*u.shape)                       # kept at 16 bits: already fp16-rounded in place
        kept.weight.copy_(unit_weight(modules, u).detach().half())
        return kept
    _attach_experts(model, units, part)


def apply(model: nn.Module, plan: BitPlan | str | os.PathLike, *, quantizer: str = "rtn",
          calibration: torch.Tensor | None = None, progress: bool = True,
          compute_device: str | torch.device | None = None, force: bool = False,
          info: dict | None = None, format: str = "bitalloc", out: str | os.PathLike | None = None,
          tokenizer=None, exact: bool = False, imatrix: str | os.PathLike | None = None) -> nn.Module | dict:
    """Quantize ``model`` by ``plan`` (a BitPlan or a plan JSON path) and replace each planned layer by a
    packed QuantLinear, in place. ``compute_device``: the weights stay on the host and the quantization runs
    there (GPTQ one decoder block at a time, alloc/models/stream.py); the packed layers stay on the host.

    Layers planned at 16 bits stay ordinary layers with fp16-rounded weights. Returns the model, which
    carries the plan as ``model.bitalloc_plan``. A plan made for another model (alloc/provenance.py: its
    hash, or its layers' weights when read in another dtype) is refused unless ``force``, which records it in
    the plan; ``info``: the model's model_info when already computed.

    ``format``: "bitalloc" (default) packs in place as above and, with ``out``, also saves the packed folder
    there; "gptq", "compressed-tensors" or "gguf" write that engine's checkpoint at ``out`` (alloc/formats/,
    alloc/ggml/) and leave the model as it is, returning the writer's report (bytes, the plan as stored, …);
    ``exact`` refuses a row plan those formats cannot store instead of rounding its rows up; ``imatrix``
    (gguf, with ``calibration``) also writes llama.cpp's imatrix file of the calibration there."""
    if not isinstance(model, nn.Module):
        raise BitallocError(f"apply needs an nn.Module, got {type(model).__name__}: load the model first")
    if isinstance(plan, (str, os.PathLike)):
        plan = BitPlan.load(plan)
    if not isinstance(plan, BitPlan):
        raise BitallocError(f"plan must be a BitPlan or a plan JSON path, got {type(plan).__name__}")
    if format != "bitalloc":
        from .formats import write
        if out is None:
            raise BitallocError(f"format {format!r} writes a checkpoint: pass out= (a new folder; a .gguf file for gguf)")
        return write(model, plan, out, format, tokenizer=tokenizer, quantizer=quantizer, calibration=calibration,
                     exact=exact, force=force, info=info, progress=progress, imatrix=imatrix)
    if imatrix is not None:
        raise BitallocError("imatrix= writes llama.cpp's imatrix file: it goes with format='gguf'")
    if out is not None:
        check_new_folder(out)                       # before the slow part
    units = planned_units(model, plan)
    from .provenance import check_plan_model
    plan = check_plan_model(plan, model, units, info, force=force)
    ggml = [u.name for u in units if plan.layers[u.name].ggml]
    if ggml:
        raise BitallocError(f"the plan stores {len(ggml)} layer(s) in llama.cpp types ({few(ggml)}): write it as a GGUF "
                            "file with `bitalloc apply --format gguf --out model.gguf` (Python: format='gguf', out=…)")
    rowwise = [u.name for u in units if u.name in plan.row_bits and u.kind != "linear"]
    if rowwise:
        raise BitallocError(f"the plan mixes widths inside {len(rowwise)} non-Linear unit(s) ({few(rowwise)}): "
                            "rows of several widths are packed for Linear layers only; give these one width")
    embeddings = [u.name for u in units if u.kind == "embedding" and not plan.layers[u.name].is_float]
    if embeddings:
        raise BitallocError(f"apply packs Linear layers only; the plan quantizes embedding(s) {', '.join(embeddings)}: "
                            "allocate without --include for embeddings, or keep them at 16 bits")
    from .kernels.qlinear import QuantLinear
    from .kernels.qmixed import MixedQuantLinear
    from .quantize import RowQuantized
    modules = dict(model.named_modules())
    packed: dict[str, nn.Module] = {}

    def pack(name: str, q) -> None:            # codes -> packed bits as soon as each unit is quantized
        bias = getattr(modules[name], "bias", None) if name in modules else None
        packed[name] = MixedQuantLinear.from_quantized(q, bias) if isinstance(q, RowQuantized) \
            else QuantLinear.from_quantized(q, bias)

    # RTN: the packed layers replace the fp ones, so their dequantized weights are never written back (that
    # would turn a memory-mapped checkpoint's pages into private copies: one more model's worth of memory)
    quantize_model(model, units, plan, quantizer=quantizer, calibration=calibration, progress=progress, sink=pack,
                   compute_device=compute_device, write_back=quantizer != "rtn")
    _pack_experts(model, units, packed)
    for u in units:
        if u.name not in packed or u.kind in EXPERT_KINDS:
            continue
        _set_module(model, u.name, packed.pop(u.name).to(modules[u.name].weight.device))
    model.bitalloc_plan = plan
    if out is not None:
        from .models.loading import tokenizer_for
        save(model, out, tokenizer_for(model, tokenizer))
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """Write a packed model (see the module docstring). The folder appears whole or not at all."""
    from safetensors.torch import save_model

    from .files import clean_stale, is_write_error, os_error_line, temp_prefix
    plan = getattr(model, "bitalloc_plan", None)
    if plan is None:
        raise BitallocError("this model is not packed: call bitalloc.apply(model, plan) first")
    out = check_new_folder(out_dir)
    model, dtype = _in_source_dtype(model)
    clean_stale(out.parent)                      # what a killed save left behind (tens of GB on a 70B model)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"bitalloc_format": str(FORMAT_VERSION),
                                                        "dtype": str(dtype).removeprefix("torch.")})
        plan.save(tmp / PLAN)
        config = getattr(model, "config", None)
        if config is not None:
            if not getattr(config, "architectures", None):    # built from a config: name the class for load()
                config.architectures = [type(model).__name__]
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_write_error(e):
            need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            raise BitallocError(os_error_line(e, out, need_bytes=need)) from None
        raise
    return out


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _read_header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: shape}) through safetensors' own reader (it bounds and validates the header),
    without reading the tensors."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise BitallocError(f"{path} is not a readable safetensors file ({first}): re-run `bitalloc apply`") from None


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """A packed model from a folder written by :func:`save`, in a fresh process, outputs reproduced exactly."""
    import transformers
    from safetensors.torch import load_model as st_load

    from .kernels.qlinear import QuantLinear
    from .kernels.qmixed import MixedQuantLinear
    folder = Path(path)
    weights = folder / WEIGHTS
    if not weights.is_file() or not (folder / PLAN).is_file():
        raise BitallocError(f"{str(folder)!r} is not a packed bitalloc checkpoint (needs {WEIGHTS} and {PLAN}): "
                            "write one with `bitalloc apply`")
    meta, shapes = _read_header(weights)
    version = meta.get("bitalloc_format")
    if version is None:
        raise BitallocError(f"{weights} has no bitalloc_format in its metadata: it was not written by bitalloc")
    if not str(version).isdigit():
        raise BitallocError(f"{weights} has bitalloc_format {str(version)[:20]!r}, not a number: it was not written by bitalloc")
    if int(version) > FORMAT_VERSION:
        raise BitallocError(f"{weights} is packed format {version}, newer than this bitalloc reads ({FORMAT_VERSION}): "
                            "upgrade bitalloc")
    plan = BitPlan.load(folder / PLAN)
    if meta.get("dtype", "float32") not in DTYPES:
        raise BitallocError(f"{weights} names dtype {str(meta.get('dtype'))[:40]!r}, not one of {', '.join(DTYPES)}: "
                            "it was not written by bitalloc")
    dtype = DTYPES[meta.get("dtype", "float32")]
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = getattr(config, "architectures", None) or []
    cls = transformers.AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) \
        else transformers.AutoModel
    model = cls.from_config(config, dtype=dtype)
    units = planned_units(model, plan)
    _empty_experts(model, units, plan)
    modules = dict(model.named_modules())
    for u in units:
        spec = plan.layers[u.name]
        if spec.is_float or u.kind in EXPERT_KINDS:
            continue
        out_f, in_f = u.shape
        has_bias = getattr(modules[u.name], "bias", None) is not None
        if u.name in plan.row_bits:
            q = MixedQuantLinear(in_f, out_f, plan.row_bits[u.name], spec.group_size, spec.symmetric, has_bias,
                                 dtype)
        else:
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


def _empty_experts(model: nn.Module, units, plan: BitPlan) -> None:
    """Unfilled QuantExperts in place of each planned 3-D expert parameter (for loading a checkpoint)."""
    from .kernels.qexperts import empty_part
    _attach_experts(model, units, lambda u, modules: empty_part(plan.layers[u.name], *u.shape))


def checkpoint_bytes(model: nn.Module, units, plan: BitPlan) -> float:
    """About what the checkpoint of ``model`` packed by ``plan`` takes: the packed layers plus every other
    tensor in the source dtype (checked against the free space before the slow part)."""
    source = getattr(model, "bitalloc_source_dtype", None)
    modules = dict(model.named_modules())
    planned = {id(getattr(modules[u.module_name], u.param)) if u.kind in EXPERT_KINDS
               else id(getattr(modules[u.name], "weight", None)) for u in units}
    rest = sum(p.numel() * (source.itemsize if source is not None else p.element_size())
               for p in model.parameters() if id(p) not in planned)
    return plan.size_bytes() + rest


def checkpoint_report(model: nn.Module, folder: str | os.PathLike) -> dict:
    """Actual file size against the size the plan promises:
    true bpw x quantized params / 8 + bytes of every tensor that is not quantized."""
    plan: BitPlan = model.bitalloc_plan
    quantized = {n for n, s in plan.layers.items() if not s.is_float}
    q_params = sum(plan.shapes[n][0] * plan.shapes[n][1] for n in quantized)
    q_bits = sum(plan.layer_size_bits(n) for n in quantized)
    from .kernels.qexperts import FloatExpert
    from .kernels.qlinear import QuantLinear
    from .kernels.qmixed import MixedQuantLinear
    source = getattr(model, "bitalloc_source_dtype", None)
    modules = dict(model.named_modules())
    rest, seen = 0, set()
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if leaf in ("qweight", "scales", "qzeros", "row_tags") or t.data_ptr() in seen:
            continue                      # a packed unit's storage (counted by the plan), or a tied tensor
        seen.add(t.data_ptr())
        packed = isinstance(modules.get(owner), (QuantLinear, MixedQuantLinear, FloatExpert))
        size = source.itemsize if source is not None and t.is_floating_point() and not packed else t.element_size()
        rest += t.numel() * size          # saved in the source dtype (see _in_source_dtype)
    expected = q_bits / 8 + rest
    actual = (Path(folder) / WEIGHTS).stat().st_size
    return {"actual_bytes": actual, "expected_bytes": expected, "quantized_params": q_params,
            "true_bpw": q_bits / max(q_params, 1), "relative_diff": actual / expected - 1}
