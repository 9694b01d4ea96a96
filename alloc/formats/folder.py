"""What the folder writers (compressed-tensors, GPTQ) share: quantize the planned layers with bitalloc's own
quantizers into a format's tensors, keep every other tensor in the checkpoint's dtype, and write the folder
whole or not at all (config.json with a ``quantization_config``, model.safetensors, the plan, the tokenizer)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..files import clean_stale, temp_prefix
from ..plan import BitPlan

WEIGHTS = "model.safetensors"


def checkpoint_tensors(model: nn.Module, units, plan: BitPlan, pack: Callable, *, quantizer="rtn",
                       calibration: torch.Tensor | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """{tensor name: tensor}: ``pack(name, QuantizedWeight)``'s tensors (local names) for every quantized unit
    of ``plan``, every other tensor of the model in its source dtype (16-bit units fp16-rounded). The caller's
    model is left as it was (quantize_model writes GPTQ weights back and rounds 16-bit units in place)."""
    from ..packed import _in_source_dtype
    from ..quantize_model import quantize_model
    tensors: dict[str, torch.Tensor] = {}

    def sink(name, q):
        for k, t in pack(name, q).items():
            tensors[f"{name}.{k}"] = t
    saved = {u.name: model.get_submodule(u.name).weight.detach().clone() for u in units
             if quantizer != "rtn" or plan.layers[u.name].is_float}
    try:
        quantize_model(model, units, plan, quantizer=quantizer, calibration=calibration, progress=progress,
                       sink=sink, write_back=quantizer != "rtn")
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                model.get_submodule(name).weight.copy_(w)
    source, _ = _in_source_dtype(model)
    packed = {f"{n}.weight" for n, s in plan.layers.items() if not s.is_float}
    seen = set()
    for name, t in source.state_dict().items():
        if name in packed or (t.data_ptr() in seen and name.endswith("lm_head.weight")):
            continue                                   # a packed layer, or a head tied to the embeddings
        seen.add(t.data_ptr())
        owner = name.removesuffix(".weight")
        if owner in plan.layers and plan.layers[owner].is_float:
            t = t.half().to(t.dtype)                   # a 16-bit layer of the plan: fp16-rounded, as everywhere
        tensors[name] = t.detach().contiguous()
    return tensors


def write_folder(out: Path, model: nn.Module, tensors: dict[str, torch.Tensor], quantization_config: dict,
                 plan: BitPlan, tokenizer=None, extra_files: dict[str, dict] | None = None) -> int:
    """The checkpoint folder ``out`` (new; written in a temporary folder beside it, then renamed); returns the
    weights file's size."""
    from safetensors.torch import save_file

    from ..packed import _in_source_dtype
    _, dtype = _in_source_dtype(model)
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
