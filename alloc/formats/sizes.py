"""The bytes a folder writer (compressed-tensors, GPTQ) writes for a plan, counted without quantizing anything
(``allocate --size`` for those formats, issue #34).

A folder is model.safetensors (a JSON header, then every tensor), config.json (with the format's
``quantization_config``), the plan, the tokenizer's files and, for GPTQ, quantize_config.json. Each planned
piece's tensors have the shapes its packer gives (``packed``: compressed-tensors packs codes densely into
int32 with float32 scales; GPTQ packs 32 codes into ``bits`` int32 words with fp16 scales and an int32 g_idx);
every other tensor keeps the checkpoint's dtype. The header is laid out as safetensors lays it out (tensors
by dtype, widest first, then by name; the JSON padded to 8 bytes), so the count is exact, which the tests check
against written folders.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from ..options import QuantSpec

# safetensors' dtype names and their order in its layout (the data is sorted by dtype, this order reversed)
ST_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
             torch.int64: "I64"}
ST_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
            "I64", "U64"]
ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "F64": 8, "I64": 8}


def packed(fmt: str, spec: QuantSpec, rows: int, cols: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor suffix: (safetensors dtype, shape)} of one ``rows`` × ``cols`` Linear piece in ``spec``."""
    groups = 1 if spec.group_size == -1 else cols // spec.group_size
    b = spec.bits
    if fmt == "compressed-tensors":
        out = {"weight_packed": ("I32", (rows, math.ceil(cols * b / 32))),
               "weight_scale": ("F32", (rows, groups)),
               "weight_shape": ("I64", (2,))}
        if not spec.symmetric:
            out["weight_zero_point"] = ("I32", (math.ceil(rows * b / 32), groups))
        return out
    if fmt == "gptq":
        return {"qweight": ("I32", (cols // 32 * b, rows)), "qzeros": ("I32", (groups, rows * b // 32)),
                "scales": ("F16", (groups, rows)), "g_idx": ("I32", (cols,))}
    raise ValueError(fmt)


def header_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None) -> int:
    """The size of the safetensors header (its 8-byte length and the padded JSON) for these tensors."""
    order = sorted(tensors, key=lambda n: (-ST_ORDER.index(tensors[n][0]), n))
    entries, offset = {}, 0
    for name in order:
        dtype, shape = tensors[name]
        size = ST_BYTES[dtype] * math.prod(shape)
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = {"__metadata__": metadata} if metadata else {}
    text = json.dumps({**head, **entries}, separators=(",", ":"))
    return 8 + -(-len(text.encode()) // 8) * 8


def data_bytes(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    return sum(ST_BYTES[d] * math.prod(s) for d, s in tensors.values())


def folder_bytes(fmt: str, model, tokenizer, plan, units) -> int:
    """The exact bytes ``apply --format fmt`` writes for ``plan`` (every file of the folder)."""
    from .folder import _unit_pieces, in_source_dtype
    from .disk import disk_layout, state_tensors
    layout = disk_layout(model)
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    packed_disk = set()
    modules = {}                                  # module on disk -> its unit (the config's targets)
    for u in units:
        spec = plan.layers[u.name]
        pieces = _unit_pieces(u, layout)
        modules.update({p.module: u.name for p, _ in pieces})
        if spec.is_float:
            continue
        for piece, _ in pieces:
            packed_disk.add(piece.disk)
            rows, cols = piece.shape[0], piece.shape[-1]
            for k, entry in packed(fmt, spec, rows, cols).items():
                tensors[f"{piece.module}.{k}"] = entry
    source, dtype = in_source_dtype(model)
    for name, t in state_tensors(source).items():
        for piece in layout.get(name, ()):
            if piece.disk not in packed_disk:
                tensors[piece.disk] = (ST_DTYPES[t.dtype], tuple(piece.shape))
    weights = header_bytes(tensors, {"format": "pt"}) + data_bytes(tensors)
    return weights + _side_files(fmt, model, tokenizer, plan, modules, dtype)


def _side_files(fmt: str, model, tokenizer, plan, modules: dict[str, str], dtype) -> int:
    """config.json, quantize_config.json (GPTQ), the plan and the tokenizer's files, as the writers write them;
    ``modules``: {module on disk: its unit}."""
    if fmt == "compressed-tensors":
        from .compressed_tensors import quantization_config, stored_plan
        specs = {n: plan.layers[n] for n in plan.layers}
        qconfig = quantization_config({m: specs[u] for m, u in modules.items()})
        plan, extra = stored_plan(plan, specs), {}
    else:
        from .gptq import gptq_config
        qconfig = gptq_config(plan, modules)
        extra = {"quantize_config.json": qconfig}
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    total = len(json.dumps(config, indent=2, default=str).encode())
    total += sum(len(json.dumps(c, indent=2).encode()) for c in extra.values())
    with tempfile.TemporaryDirectory() as scratch:
        plan.save(Path(scratch) / "plan.json")
        total += (Path(scratch) / "plan.json").stat().st_size
        if tokenizer is not None:
            tokenizer.save_pretrained(scratch)
            total += sum(p.stat().st_size for p in Path(scratch).iterdir() if p.name != "plan.json")
    return total
