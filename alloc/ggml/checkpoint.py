"""Stage 4 for llama.cpp: a plan applied as a GGUF file (``apply --format gguf``, ``bitalloc.save_gguf``),
and the same weights in memory (``fake_quantize``) to check the file against."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..plan import BitPlan
from .imatrix import energy, input_sums, save_imatrix
from .plan_types import plan_types, types_bits
from .types import quantize


def save_gguf(model: nn.Module, plan: BitPlan | str | os.PathLike, out: str | os.PathLike, *, tokenizer,
              calibration: torch.Tensor | None = None, exact: bool = False, force: bool = False,
              info: dict | None = None, progress: bool = True, types: dict[str, str] | None = None,
              embedding: str = "Q8_0", imatrix: str | os.PathLike | None = None, dataset: str = "",
              quantizer: str = "rtn", keep_weights: bool = False) -> dict:
    """Write ``model`` quantized by ``plan`` as the GGUF file ``out``; ``calibration`` token windows weight the
    rounding by each column's input energy; ``types``: plan_types' answer when already computed;
    ``embedding``: the ggml type of the token embedding when the plan leaves it out (llama.cpp's presets
    quantize it too, Q8_0 where their K-quant does not fit; "F16" keeps it); ``imatrix``: also write the
    calibration's statistics there as llama.cpp's imatrix file (``dataset`` names the text in it);
    ``quantizer`` "gptq" rounds each planned matrix by GPTQ on its type's grid (ggml/gptq.py, one decoder
    block at a time with the blocks before it quantized) instead of the importance-weighted search alone
    ("rtn"); ``keep_weights``: the report also holds {unit: the weight as the file decodes it} of those.

    Returns what was written: {"types": {type: count of planned units}, "embedding": its type when added
    here (else None), "bpw" of the planned units in their ggml types,
    "plan_bpw", "bytes" of the file, "tensor_bytes" of its tensors, "units": {tensor's module: type}, the
    embedding included, "importance": the input energies (or None), "imatrix_entries": tensors in the imatrix
    file (None when not written)}."""
    from ..errors import BitallocError
    from ..units import planned_units
    from ..provenance import check_plan_model
    from .writer import write
    if quantizer not in ("rtn", "gptq"):
        raise BitallocError(f"unknown quantizer {quantizer!r}: choose rtn or gptq")
    if imatrix is not None and calibration is None:
        raise BitallocError("an imatrix file holds the calibration's statistics: give calibration tokens")
    if not isinstance(plan, BitPlan):
        plan = BitPlan.load(plan)
    units = planned_units(model, plan)
    plan = check_plan_model(plan, model, units, info, force=force)
    types = plan_types(plan, units, exact=exact) if types is None else types
    embedded = embedding_type(model, types, embedding)
    types = {**types, **embedded}
    importance = None
    if calibration is not None:
        sums, counts = input_sums(model, units, calibration, progress=progress)
        importance = energy(sums, counts)
    packed, kept = ({}, {}) if quantizer == "gptq" else (None, None)
    if quantizer == "gptq":
        _gptq_packed(model, units, plan, types, calibration, packed, kept if keep_weights else None, progress)
    tensor_bytes = write(model, tokenizer, types, out, importance=importance, progress=progress, packed=packed)
    entries = None
    if imatrix is not None:
        try:
            entries = save_imatrix(model, sums, counts, imatrix, dataset=dataset, chunks=len(calibration),
                                   chunk_size=calibration.shape[1])
        except BaseException:
            Path(out).unlink(missing_ok=True)        # both files or neither
            raise
    return {"types": dict(Counter(types[u.name] for u in units)), "embedding": next(iter(embedded.values()), None),
            "bpw": types_bits({u.name: types[u.name] for u in units}, units), "plan_bpw": plan.true_bpw,
            "bytes": Path(out).stat().st_size, "tensor_bytes": tensor_bytes, "units": types, "importance": importance,
            "imatrix_entries": entries, "weights": kept}


def _gptq_packed(model, units, plan, types, calibration, packed: dict, kept: dict | None, progress: bool) -> None:
    """GPTQ on each planned 2-D unit's ggml grid: {unit: its packed blocks} into ``packed`` (and the decoded
    weights into ``kept``); the model's weights are left as they were. MoE expert stacks keep the search."""
    import warnings

    from ..errors import BitallocError, BitallocWarning
    from ..options import QuantSpec
    from ..quantize_model import quantize_model, set_unit_weights
    from ..units import EXPERT_KINDS, unit_weight
    from . import layout
    if calibration is None:
        raise BitallocError("GPTQ needs calibration tokens to round by")
    flat = [u for u in units if u.kind not in EXPERT_KINDS]
    if len(flat) < len(units):
        warnings.warn(f"{len(units) - len(flat)} MoE expert stack(s) are rounded by the importance-weighted search, "
                      "not GPTQ (GPTQ on ggml grids covers 2-D weights)", BitallocWarning, stacklevel=3)
    specs = {u.name: QuantSpec(16) if types[u.name] == "F16" else QuantSpec.of_ggml(types[u.name]) for u in flat}
    gplan = BitPlan(specs, {u.name: u.shape for u in flat}, plan.budget_bits, solver=plan.solver)
    modules = dict(model.named_modules())
    saved = {u.name: unit_weight(modules, u).detach().clone() for u in flat}

    def sink(name, q):
        packed[name] = layout.pack(q)
        if kept is not None:
            kept[name] = q.dequantize()
    try:
        quantize_model(model, flat, gplan, quantizer="gptq", calibration=calibration, progress=progress, sink=sink)
    finally:
        set_unit_weights(model, flat, saved)


def embedding_type(model: nn.Module, types: dict[str, str], embedding: str) -> dict[str, str]:
    """{the token embedding's module name: ``embedding``} when the plan leaves it out, else {}."""
    from .types import TYPES
    name = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None) \
        if hasattr(model, "get_input_embeddings") else None
    embedding = embedding.upper()
    if name is None or name in types or embedding == "F16":
        return {}
    if embedding not in TYPES:
        from ..errors import BitallocError
        raise BitallocError(f"embedding type {embedding!r} is not a ggml type: choose F16 or one of {', '.join(TYPES)}")
    width = model.get_input_embeddings().weight.shape[1]
    return {name: embedding if TYPES[embedding].fits(width) else "Q8_0"}


@torch.no_grad()
def fake_quantize(model: nn.Module, units: dict[str, str], importance: dict[str, torch.Tensor] | None = None,
                  weights: dict[str, torch.Tensor] | None = None) -> None:
    """In place: each unit of ``units`` ({name: ggml type}) holds the weights its type decodes to, and every
    other matrix is rounded to fp16 as the GGUF stores it: the numbers a reader of the file computes with.
    An MoE expert stack (3-D) takes its stack's type (writer.stack_type), each expert weighted by its own row
    of importance; routers stay in float32 (writer.keeps_f32). ``weights``: units already decoded (save_gguf's
    report["weights"] under GPTQ), taken as they are."""
    from .writer import keeps_f32, stack_type
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner = name.removesuffix(".weight")
        kind = stack_type(units, name) if p.dim() == 3 else units.get(owner, "F16")
        h = None if importance is None else importance.get(owner)
        if weights and owner in weights:
            p.copy_(weights[owner].to(p.dtype))
        elif kind != "F16" and p.dim() == 3:            # each expert by its own importance row
            for e in range(p.shape[0]):
                p[e].copy_(quantize(p[e].detach(), kind, None if h is None else h[e]).dequantize().to(p.dtype))
        elif kind != "F16":
            p.copy_(quantize(p.detach(), kind, h).dequantize().to(p.dtype))
        elif (p.dim() >= 2 and not keeps_f32(name, p, modules)) or owner in units:
            p.copy_(p.half().to(p.dtype))
