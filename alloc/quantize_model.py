"""Apply a BitPlan to a model's weights: RTN or GPTQ per layer, in place (fake-quantized floats).

Returns the QuantizedWeight of every layer (codes, scales, zeros) so kernels/ can pack exactly what was
evaluated. GPTQ walks the model's blocks in order: each block's layers see inputs that went through the
already-quantized blocks before it (XᵀX collected on those), as in the GPTQ paper.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import BitallocError, BitallocWarning, few
from .models.expert_inputs import expert_hessians
from .models.stream import BlockStream
from .plan import BitPlan
from .quantize import DEFAULTS, QuantizedWeight, Quantizer, as_quantizer
from .units import EXPERT_KINDS, Unit, find_blocks, set_unit_weight, unit_weight

def unit_weights(model: nn.Module, units: Iterable[Unit]) -> dict[str, torch.Tensor]:
    """A copy of each unit's weight as (out, in)."""
    modules = dict(model.named_modules())
    return {u.name: unit_weight(modules, u).detach().clone() for u in units}


def set_unit_weights(model: nn.Module, units: Iterable[Unit], weights: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for u in units:
        if u.name in weights:
            set_unit_weight(modules, u, weights[u.name])


def quantize_model(model: nn.Module, units: list[Unit], plan: BitPlan, *, quantizer: "str | Quantizer" = "rtn",
                   calibration: torch.Tensor | None = None, batch_size: int = 8,
                   progress: bool = True, sink=None, compute_device=None,
                   write_back: bool = True) -> dict[str, QuantizedWeight]:
    """Quantize every unit of ``plan`` in place; fp16 (bits=16) units are only rounded to fp16.
    ``compute_device``: the weights stay where they are (the host) and the work runs there (GPTQ: one
    decoder block at a time, alloc/models/stream.py). ``write_back=False`` (RTN, for a packer that replaces the
    layers anyway): the quantized weights are only handed out, the model's own are left as they are.

    Returns each unit's QuantizedWeight, or, with ``sink``, hands each to ``sink(unit name, q)`` as soon as it is
    made and keeps none (int32 codes take 4 bytes per weight: a packer turns them into bits at once)."""
    quantizer = as_quantizer(quantizer)
    plan.check_units(units)
    out = _Sink(sink) if sink is not None else {}
    if quantizer.method == "rtn":
        _rtn_model(model, units, plan, progress, out, compute_device, write_back, quantizer)
    elif calibration is None:
        raise BitallocError("GPTQ needs calibration text: pass --calib FILE (or calibration tokens)")
    else:
        _gptq_model(model, units, plan, calibration, batch_size, progress, out, compute_device, quantizer)
    return {} if sink is not None else out


class _Sink(dict):
    """A dict that passes each item to ``fn(unit name, q)`` instead of keeping it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __setitem__(self, name, q):
        self.fn(name, q)


def _rtn_model(model, units, plan, progress, out, compute_device=None, write_back=True,
               quantizer: Quantizer = DEFAULTS["rtn"]) -> None:
    modules = dict(model.named_modules())
    for u in tqdm(units, desc="quantize (rtn)", leave=False, disable=not progress):
        _quantize_unit(modules, u, plan.layers[u.name], quantizer.rtn, out, plan.row_bits.get(u.name),
                       compute_device, write_back)


def _quantize_unit(modules: dict[str, nn.Module], u: Unit, spec, method, out: dict[str, QuantizedWeight],
                   row_bits=None, device=None, write_back=True) -> None:
    """Write ``method(W, spec)``'s dequantized weight in ``u``'s place (unless ``write_back`` is off) and
    record it in ``out`` (on the host); fp16 units (bits=16) are only rounded to fp16 and not recorded.
    ``row_bits``: each output row at its own width (RTN per width, or GPTQ with a per-row grid), recorded as
    a RowQuantized. ``device``: where to compute (default: where the weight is)."""
    W = unit_weight(modules, u).detach().to(device)          # the quantizers take any float dtype
    if spec.is_float:
        set_unit_weight(modules, u, W.half().float())
        return
    q = method(W, spec) if row_bits is None else method(W, spec, row_bits=row_bits)
    out[u.name] = q.to("cpu")
    if write_back:
        set_unit_weight(modules, u, q.dequantize())


def gptq_units(model, units, plan, run, out, quantizer: Quantizer = DEFAULTS["gptq"]) -> None:
    """Collect XᵀX for ``units`` with one pass of ``run()``, then GPTQ each of them in place (where its weight
    is: a block on the compute device), recording each QuantizedWeight in ``out``. ``quantizer.sequential``:
    the units are quantized in groups that read the same input (q/k/v, then o, then gate/up, then down, in the
    order the forward pass reaches them), XᵀX collected again before each group with the earlier ones quantized."""
    modules = dict(model.named_modules())
    H: dict[str, torch.Tensor] = {}
    order: dict[str, tuple[int, torch.Tensor]] = {}   # unit -> (first call, its input tensor, held for the pass)
    _collect(modules, units, run, H, order)
    unreached = [u.name for u in units if u.kind in EXPERT_KINDS and u.name not in H]
    if unreached:
        warnings.warn(f"GPTQ rounds {len(unreached)} MoE expert unit(s) to nearest (RTN): their inputs were not seen "
                      f"({few(unreached)}): no calibration token "
                      "reached them, or the experts module multiplies by its expert slices in a way "
                      "alloc/models/expert_inputs.py does not catch (F.linear or x @ W per expert)", BitallocWarning, stacklevel=4)
    groups = _sequential_groups(units, order) if quantizer.sequential else [units]
    order.clear()
    for k, group in enumerate(groups):
        if k > 0:                          # the groups before are quantized now: their effect on this one's inputs
            H.clear()
            _collect(modules, group, run, H, {})
        for u in group:
            # embeddings and experts no calibration token reached are rounded to nearest
            method = quantizer.rtn if u.name not in H else \
                (lambda W, spec, H=H[u.name], **kw: quantizer.gptq(W, H, spec, **kw))
            _quantize_unit(modules, u, plan.layers[u.name], method, out, plan.row_bits.get(u.name))


def _collect(modules, units, run, H: dict, order: dict) -> None:
    """One pass of ``run()`` adding each unit's Σ xᵀx to ``H`` (and, in ``order``, when it was first reached
    and by which input tensor)."""
    def hook(name):
        def fn(module, args, output):
            x = args[0]
            order.setdefault(name, (len(order), x))          # held: its id is not reused meanwhile
            x = x.detach().reshape(-1, x.shape[-1]).float()
            H[name] = H.get(name, 0) + x.T @ x
        return fn

    hooked = [u for u in units if u.kind not in ("embedding", *EXPERT_KINDS)]
    handles = [modules[u.name].register_forward_hook(hook(u.name)) for u in hooked]
    try:
        with torch.no_grad(), expert_hessians(modules, units, H):
            run()
    finally:
        for h in handles:
            h.remove()


def _sequential_groups(units: list[Unit], order: dict) -> list[list[Unit]]:
    """``units`` in groups that read one input tensor, in the order the forward pass reached them; units not
    reached by a hook (MoE experts, embeddings) join the last group."""
    reached = sorted((u for u in units if u.name in order), key=lambda u: order[u.name][0])
    groups: list[list[Unit]] = []
    inputs: dict[int, int] = {}
    for u in reached:
        key = id(order[u.name][1])
        if key not in inputs:
            inputs[key] = len(groups)
            groups.append([])
        groups[inputs[key]].append(u)
    rest = [u for u in units if u.name not in order]
    if rest:
        groups = groups or [[]]
        groups[-1] += rest
    return groups


def _gptq_model(model, units, plan, calibration, batch_size, progress, out, compute_device=None,
                quantizer: Quantizer = DEFAULTS["gptq"]) -> None:
    """GPTQ block by block (alloc/models/stream.py): each block's XᵀX is collected on the hidden states that went
    through the already-quantized blocks before it, its units are quantized where the block sits (the compute
    device when the weights stay on the host: the quantized weights then replace the host ones), and its
    quantized outputs feed the next block. Units after the blocks (an LM head) see the last block's output."""
    batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
    if not find_blocks(model, units):
        def run_model():
            for b in batches:
                model(input_ids=b.to(next(model.parameters()).device), use_cache=False)
        gptq_units(model, units, plan, run_model, out, quantizer)
        return
    stream = BlockStream(model, units, compute_device)
    device = stream.device
    with stream.resident(keep=True):
        with torch.no_grad():
            firsts = [stream.inputs(b) for b in batches]
        extras = [extra for _, extra in firsts]
        hidden = [h.cpu() for h, _ in firsts]              # boundary activations stay on the host
        del firsts
        for i, (name, _) in enumerate(tqdm(stream.blocks, desc="quantize (gptq)", leave=False, disable=not progress)):
            block_units = [u for u in units if stream.block_of(u) == i]
            with stream.block_on_device(i, keep=True):
                def run_block(i=i, hidden=hidden):
                    for h, e in zip(hidden, extras):
                        stream.run_block(i, h.to(device), e)
                gptq_units(model, block_units, plan, run_block, out, quantizer)
                with torch.no_grad():       # the quantized block's outputs feed the next block
                    hidden = [stream.run_block(i, h.to(device), e).cpu() for h, e in zip(hidden, extras)]
        rest = [u for u in units if stream.block_of(u) is None]
        if rest:
            # only a Linear after the blocks (an untied LM head) needs their output: an embedding's input is a
            # token (rounded to nearest), and the logits of Gemma-3's 262k vocabulary took half a minute
            reads = any(u.kind not in ("embedding", *EXPERT_KINDS) for u in rest)

            def run_rest():
                for h, b in zip(hidden, batches) if reads else ():
                    stream.rest(h.to(device), b)
            gptq_units(model, rest, plan, run_rest, out, quantizer)
