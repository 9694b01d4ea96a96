"""Input energy per column of each planned Linear layer: the mean square of the inputs over the calibration
tokens (what llama.cpp's importance matrix holds), weighting the ggml quantizer's rounding error; and the
same statistics as llama.cpp's imatrix file (``save_imatrix``), for llama-quantize's ``--imatrix``.

Collected one decoder block at a time (alloc/models/stream.py) when the model has blocks, so it needs one
block's activations, as GPTQ does.

The imatrix file is llama.cpp's GGUF form (``general.type`` "imatrix"): per weight tensor of the model's GGUF,
``<tensor>.in_sum2`` (F32, the sum of x² per input column) and ``<tensor>.counts`` (F32, the tokens summed),
one row per expert matrix (MoE stacks ``ffn_*_exps``: one per expert, as llama.cpp collects them), and
``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..models.expert_inputs import expert_energy
from ..units import EXPERT_KINDS


def input_energy(model: nn.Module, units, tokens: torch.Tensor, *, batch_size: int = 4,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """{unit name: (in,) float32 mean of x² per input column} for the Linear units of ``units``."""
    return energy(*input_sums(model, units, tokens, batch_size=batch_size, progress=progress))


def energy(sums: dict[str, torch.Tensor], counts: dict) -> dict[str, torch.Tensor]:
    """``input_sums``' answer as the mean x² per input column (float32); an expert no token reached weighs
    every column alike."""
    out = {}
    for k, v in sums.items():
        c = torch.as_tensor(counts[k], dtype=torch.float64)
        out[k] = (v / c.clamp(min=1)[..., None] if c.dim() else v / max(float(c), 1.0)).float()
        if c.dim():
            out[k][c == 0] = 1.0
    return out


def input_sums(model: nn.Module, units, tokens: torch.Tensor, *, batch_size: int = 4,
               progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """({unit name: (in,) float64 sum of x² per input column}, {unit name: tokens summed}) for the Linear
    units of ``units``; for MoE experts, per stack parameter (``mlp.experts.gate_up_proj``): (E, in) sums and
    (E,) token counts, one row per expert (alloc/models/expert_inputs.py)."""
    from ..models.stream import BlockStream
    from ..units import find_blocks
    modules = dict(model.named_modules())
    linear = [u for u in units if u.kind not in ("embedding", *EXPERT_KINDS) and u.name in modules]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0).double().cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn
    handles = [modules[u.name].register_forward_hook(hook(u.name)) for u in linear]
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    expert_sums: dict[tuple, torch.Tensor] = {}
    expert_counts: dict[tuple, int] = {}
    try:
        with torch.no_grad(), expert_energy(modules, units, expert_sums, expert_counts):
            if not find_blocks(model, linear):
                for b in tqdm(batches, desc="importance", leave=False, disable=not progress):
                    model(input_ids=b.to(next(model.parameters()).device), use_cache=False)
            else:
                stream = BlockStream(model, linear, None)
                with stream.resident(keep=True):
                    hidden = [stream.inputs(b) for b in batches]
                    for i in tqdm(range(len(stream.blocks)), desc="importance", leave=False, disable=not progress):
                        with stream.block_on_device(i, keep=True):
                            hidden = [(stream.run_block(i, h, e), e) for h, e in hidden]
                    if any(stream.block_of(u) is None for u in linear):      # an untied LM head
                        for (h, _), b in zip(hidden, batches):
                            stream.rest(h, b)
    finally:
        for h in handles:
            h.remove()
    for u in units:
        stack = f"{u.module_name}.{u.param}"
        if u.kind in EXPERT_KINDS and stack not in sums:
            n = getattr(modules[u.module_name], u.param).shape[0]
            width = u.shape[1]
            sums[stack] = torch.stack([expert_sums.get((stack, e), torch.zeros(width, dtype=torch.float64))
                                       for e in range(n)])
            counts[stack] = torch.tensor([expert_counts.get((stack, e), 0) for e in range(n)])
    return sums, counts


def save_imatrix(model: nn.Module, sums: dict[str, torch.Tensor], counts: dict[str, int], out, *,
                 dataset: str, chunks: int, chunk_size: int) -> int:
    """Write llama.cpp's imatrix file ``out`` (GGUF form, see the module docstring) from ``input_sums``'
    answer, each unit under the name its weight has in the model's GGUF; ``chunks`` windows of ``chunk_size``
    tokens were measured. Returns the number of entries."""
    import gguf
    import numpy as np

    from ..files import atomic_path
    from .writer import expert_part_names, tensor_names
    names = tensor_names(model)
    entries = {}
    for unit, total in sums.items():
        count = torch.as_tensor(counts[unit], dtype=torch.float32).reshape(-1, 1).numpy()
        rows = total.float().numpy().reshape(count.shape[0], -1)       # one row per expert (1 for a Linear)
        for part in expert_part_names(unit) if total.dim() == 2 else [unit]:                        # gate_up: ffn_gate_exps and ffn_up_exps read the same input
            name = names.get_name(part + ".weight", try_suffixes=(".weight",))
            if name is not None:
                entries[name] = (rows, count)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch="")
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunks)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(entries):
            in_sum2, count = entries[name]
            w.add_tensor(f"{name}.in_sum2", in_sum2)
            w.add_tensor(f"{name}.counts", count)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return len(entries)
