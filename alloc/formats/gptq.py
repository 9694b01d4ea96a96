"""``apply --format gptq``: the plan as a GPTQ checkpoint in the layout GPTQModel, AutoGPTQ and vLLM read
(``checkpoint_format: gptq``, the "v1" layout), with bitalloc's own RTN or GPTQ codes.

Per planned layer (``out`` × ``in``, groups of ``g`` inputs, ``G`` groups):

    qweight  (in·bits/32, out) int32: along the input dimension, each run of 32 codes is one little-endian
             bit stream of 32·bits bits, code k at bit bits·k, cut into ``bits`` words (for 3 bits codes
             straddle words: AutoGPTQ's layout)
    qzeros   (G, out·bits/32) int32: each zero point minus one (the v1 convention; the kernels add it back),
             packed the same way along the output dimension
    scales   (G, out) float16 (our scales are fp16 values)
    g_idx    (in,) int32: each input's group, i // g (groups stay contiguous runs of inputs, desc_act false)

``quantization_config``: the most common format as ``bits``/``group_size``/``sym`` and per-module overrides in
GPTQModel's ``dynamic`` (``-:`` for layers kept in 16 bits; export.gptqmodel_config), on the module names of
the checkpoint: MoE experts are written one module per expert and projection, under the names transformers
saves them by (formats/disk.py; Mixtral's ``block_sparse_moe.experts.N.w1``). vLLM fuses q/k/v and
gate/up and refuses a checkpoint whose fused projections differ: such plans are refused here (plan with
``--fuse`` or ``--target vllm``). Symmetric plans are written in the v1 layout (vLLM, GPTQModel, AutoGPTQ);
asymmetric ones as ``gptq_v2`` (zero points as they are), which GPTQModel reads: GPTQModel refuses asymmetric
v1 files it did not write itself (old v1 writers overflowed zero points of 0, which v1 cannot hold), and
vLLM's GPTQ kernels are fast for symmetric codes only (``--symmetric`` or ``--target vllm``).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .. import __version__
from ..errors import BitallocError, few
from ..plan import BitPlan

BITS = (2, 3, 4, 8)


def pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n, cols) codes (n a multiple of 32) -> (..., n·bits/32, cols) int32 words: each run of 32 codes
    along dim -2 as one bit stream, code k at bit bits·k."""
    *lead, n, cols = values.shape
    v = values.to(torch.int64).reshape(*lead, n // 32, 32, cols)
    words = torch.zeros(*lead, n // 32, bits, cols, dtype=torch.int64, device=values.device)
    for k in range(32):
        pos = bits * k
        w, off = divmod(pos, 32)
        words[..., w, :] |= (v[..., k, :] << off) & 0xFFFFFFFF
        if off + bits > 32:                                 # the code's high bits start the next word
            words[..., w + 1, :] |= v[..., k, :] >> (32 - off)
    words = torch.where(words >= 2**31, words - 2**32, words)     # as int32 two's complement
    return words.reshape(*lead, n // 32 * bits, cols).to(torch.int32)


def pack_layer(q, spec, v1: bool = True) -> dict[str, torch.Tensor]:
    """Our QuantizedWeight (codes (out, in), scales/zeros (out, G)) as GPTQ tensors (``v1``: zeros minus one)."""
    out_f, in_f = q.codes.shape
    if in_f % 32 or out_f % 32:
        raise BitallocError(f"a {out_f}×{in_f} layer cannot be packed as GPTQ (both sides must be multiples of 32): "
                            "keep it in 16 bits (--exclude) or use --format compressed-tensors")
    if v1 and (q.zeros == 0).any():
        raise BitallocError(f"{int((q.zeros == 0).sum())} group(s) need a zero point of 0, which GPTQ's v1 layout "
                            "cannot store: plan with --symmetric (or --target vllm), or use --format compressed-tensors")
    g = in_f if spec.group_size == -1 else spec.group_size
    return {"qweight": pack_stream(q.codes.T.contiguous(), spec.bits),
            "qzeros": _pack_zeros(q.zeros - 1 if v1 else q.zeros, spec.bits),
            "scales": q.scales.T.contiguous().half(),
            "g_idx": (torch.arange(in_f) // g).to(torch.int32)}


def _pack_zeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """(out, G) -> (G, out·bits/32): packed along the output dimension."""
    return pack_stream(zeros.contiguous(), bits).T.contiguous()


def check_plan(plan: BitPlan, units) -> None:
    from ..export import split_fused_groups
    bad = [u.name for u in units if u.kind not in ("linear", "expert") or plan.layers[u.name].ggml]
    if bad:
        raise BitallocError(f"GPTQ output stores Linear layers in our formats; {len(bad)} planned unit(s) are "
                            f"embeddings, 3-D experts or ggml types ({few(bad)}): plan them out or use --format gguf")
    if all(plan.layers[u.name].is_float for u in units):
        raise BitallocError("the plan quantizes no layer: nothing to write as GPTQ")
    widths = sorted({s.bits for s in plan.layers.values() if not s.is_float} - set(BITS))
    if widths:
        raise BitallocError(f"GPTQ kernels take {list(BITS)} bits; the plan has {widths}: plan with --options 2,3,4,8")
    split = split_fused_groups({n: plan.layers[n] for n in plan.layers})
    if split:
        raise BitallocError(f"{len(split)} q/k/v or gate/up group(s) mix formats ({few(split)}): vLLM fuses these "
                            "projections and refuses such a GPTQ checkpoint; allocate with --fuse (or --target vllm)")


def gptq_config(plan: BitPlan, modules: dict[str, str]) -> dict:
    """The folder's quantization_config (and quantize_config.json); ``modules``: {module on disk: its unit}."""
    from ..export import gptqmodel_config
    config = gptqmodel_config({m: plan.layers[u] for m, u in sorted(modules.items())})
    if not all(s.symmetric for s in plan.layers.values() if not s.is_float):
        config["checkpoint_format"] = "gptq_v2"     # GPTQModel reads asymmetric v1 only from its own files
    config["meta"] = {"quantizer": [f"bitalloc:{__version__}"]}
    return config


def save(model: nn.Module, plan: BitPlan, out_dir: str | os.PathLike, *, tokenizer=None, quantizer="rtn",
         calibration: torch.Tensor | None = None, force: bool = False, info: dict | None = None,
         progress: bool = True) -> dict:
    """Write ``model`` quantized by ``plan`` as a GPTQ folder ``out_dir`` (whole or not at all); the model's own
    weights are left as they are. Returns {"bytes": the weights file's size, "config": quantization_config}."""
    from ..files import check_new_folder
    from ..units import planned_units
    from ..provenance import check_plan_model
    from .folder import checkpoint_tensors, warn_mixed_experts, write_folder
    out = check_new_folder(out_dir)
    units = planned_units(model, plan)
    plan = check_plan_model(plan, model, units, info, force=force)
    if plan.row_bits:
        raise BitallocError(f"{len(plan.row_bits)} layer(s) have per-row widths; a GPTQ layer has one: plan per layer")
    check_plan(plan, units)
    v1 = all(s.symmetric for s in plan.layers.values() if not s.is_float)
    tensors, modules = checkpoint_tensors(model, units, plan, lambda name, q: pack_layer(q, plan.layers[name], v1),
                                          quantizer=quantizer, calibration=calibration, progress=progress)
    warn_mixed_experts(plan.layers, units)
    config = gptq_config(plan, modules)
    size = write_folder(out, model, tensors, config, plan, tokenizer, {"quantize_config.json": config})
    return {"bytes": size, "config": config}
