"""Input energy per column of each planned Linear layer: the mean square of the inputs over the calibration
tokens (what llama.cpp's importance matrix holds), weighting the ggml quantizer's rounding error.

Collected one decoder block at a time (alloc/models/stream.py) when the model has blocks, so it needs one
block's activations, as GPTQ does."""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from ..units import EXPERT_KINDS


def input_energy(model: nn.Module, units, tokens: torch.Tensor, *, batch_size: int = 4,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """{unit name: (in,) float32 mean of x² per input column} for the Linear units of ``units``."""
    from ..models.stream import BlockStream
    from ..units import find_blocks
    modules = dict(model.named_modules())
    linear = [u for u in units if u.kind not in ("embedding", *EXPERT_KINDS) and u.name in modules]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.square().sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn
    handles = [modules[u.name].register_forward_hook(hook(u.name)) for u in linear]
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    try:
        with torch.no_grad():
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
                    for (h, _), b in zip(hidden, batches):
                        stream.rest(h, b)
    finally:
        for h in handles:
            h.remove()
    return {k: (v / max(counts[k], 1)).float() for k, v in sums.items()}
