"""What the folder writers (compressed-tensors, GPTQ) share: quantize the planned layers with bitalloc's own
quantizers into a format's tensors, keep every other tensor in the checkpoint's dtype, and write the folder
whole or not at all (config.json with a ``quantization_config``, model.safetensors, the plan, the tokenizer)."""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..files import clean_stale, temp_prefix
from ..errors import BitallocError
from ..plan import BitPlan
from ..quantize import QuantizedWeight
from ..units import unit_weight

WEIGHTS = "model.safetensors"


def checkpoint_tensors(model: nn.Module, units, plan: BitPlan, pack: Callable, *, quantizer="rtn",
                       calibration: torch.Tensor | None = None, progress: bool = True
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({tensor name on disk: tensor}, {module name on disk: unit}). Every quantized unit of ``plan`` is cut
    into the Linear modules its checkpoint has (an MoE expert stack: one per expert and projection;
    formats/disk.py) and each piece packed by ``pack(unit name, QuantizedWeight)`` into its format's tensors
    (local names); every other tensor is kept in the checkpoint's own dtype under its name on disk (16-bit
    units fp16-rounded). The caller's model is left as it was (quantize_model writes GPTQ weights back and
    rounds 16-bit units in place)."""
    from ..quantize_model import quantize_model, set_unit_weights
    from .disk import disk_layout, state_tensors
    layout = disk_layout(model)
    spans = {u.name: _unit_pieces(u, layout) for u in units}
    tensors: dict[str, torch.Tensor] = {}
    modules = {p.module: u for u, pieces in spans.items() for p, _ in pieces}

    def sink(name, q):
        for piece, rows in spans[name]:
            part = q if rows is None else QuantizedWeight(q.codes[rows], q.scales[rows], q.zeros[rows], q.spec)
            for k, t in pack(name, part).items():
                tensors[f"{piece.module}.{k}"] = t
    saved = {u.name: unit_weight(dict(model.named_modules()), u).detach().clone() for u in units
             if quantizer != "rtn" or plan.layers[u.name].is_float}
    try:
        quantize_model(model, units, plan, quantizer=quantizer, calibration=calibration, progress=progress,
                       sink=sink, write_back=quantizer != "rtn")
    finally:
        set_unit_weights(model, units, saved)
    source, _ = in_source_dtype(model)
    packed = {p.disk for u, pieces in spans.items() if not plan.layers[u].is_float for p, _ in pieces}
    rounded = {p.disk for u, pieces in spans.items() if plan.layers[u].is_float for p, _ in pieces}
    for name, t in state_tensors(source).items():
        for piece in layout.get(name, ()):
            if piece.disk in packed:
                continue
            part = piece.take(t.detach())
            tensors[piece.disk] = part.half().to(part.dtype) if piece.disk in rounded else part
    return tensors, modules


def _unit_pieces(u, layout) -> list:
    """[(piece, rows of the unit's codes it holds, or None for all)] of unit ``u``."""
    param = f"{u.module_name}.{u.param}"
    pieces = layout.get(param, [])
    if u.kind in ("linear", "expert"):
        rows = u.shape[0]
        start = rows * u.expert if u.expert is not None else 0
        stop = start + (rows if u.kind == "linear" or u.expert is not None else u.numel // u.shape[1])
        mine = [p for p in pieces if p.start < stop and p.stop > start]
        if mine and all(start <= p.start and p.stop <= stop and len(p.shape) == 2 for p in mine):
            return [(p, slice(p.start - start, p.stop - start)) for p in mine]
    elif len(pieces) == 1 and len(pieces[0].shape) == 2:
        return [(pieces[0], None)]                  # a whole Conv1D weight, transposed by its packer
    raise BitallocError(f"{u.name} is stored on disk as {', '.join(p.disk for p in pieces[:2]) or 'nothing'}, not "
                        "as Linear weights this format can hold: keep it in 16 bits (--exclude) or use --format gguf")


def warn_mixed_experts(specs: dict, units) -> None:
    """vLLM runs a layer's experts as one fused MoE kernel with one scheme: warn when a layer's experts differ
    (``specs``: {unit: QuantSpec})."""
    import warnings
    from collections import defaultdict

    from ..errors import BitallocWarning, few
    stacks: dict[str, set] = defaultdict(set)
    for u in units:
        if u.kind == "expert":
            stacks[u.module_name].add(specs[u.name])
    mixed = sorted(n for n, s in stacks.items() if len(s) > 1)
    if mixed:
        warnings.warn(f"{len(mixed)} MoE layer(s) give their experts different formats ({few(mixed)}): transformers "
                      "reads this, but vLLM's fused MoE kernels take one scheme per layer; allocate with "
                      "--experts per-layer (or --target vllm) for vLLM", BitallocWarning, stacklevel=3)


def write_folder(out: Path, model: nn.Module, tensors: dict[str, torch.Tensor], quantization_config: dict,
                 plan: BitPlan, tokenizer=None, extra_files: dict[str, dict] | None = None) -> int:
    """The checkpoint folder ``out`` (new; written in a temporary folder beside it, then renamed); returns the
    weights file's size."""
    from safetensors.torch import save_file

    _, dtype = in_source_dtype(model)
    clean_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        for name, content in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        plan.save(tmp / "bitalloc_plan.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (out / WEIGHTS).stat().st_size


def in_source_dtype(model: nn.Module) -> tuple[nn.Module, torch.dtype]:
    """The model with every unquantized float tensor in the checkpoint's own dtype (a copy only when the
    model was loaded in another dtype, e.g. ``--dtype fp32``), and that dtype."""
    from ..kernels.qexperts import FloatExpert
    from ..kernels.qlinear import QuantLinear
    from ..kernels.qmixed import MixedQuantLinear
    current = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    source = getattr(model, "bitalloc_source_dtype", None) or current
    if source == current:
        return model, current
    copy_ = copy.deepcopy(model)
    for module in copy_.modules():
        if isinstance(module, (QuantLinear, MixedQuantLinear, FloatExpert)):
            continue
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if t.is_floating_point():
                t.data = t.data.to(source)
    return copy_, source
