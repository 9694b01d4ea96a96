"""Block-output similarity (the "layer importance" of Layer-Wise Quantization) as a per-block multiplier.

importance(block) = 1 − mean_tokens cos(h_in, h_out): a block that barely changes its input (cosine ≈ 1)
matters little. The probe multiplies the output_error cost (tr(ΔW H ΔWᵀ), sensitivity/output_error.py) of
every unit by its block's importance; units outside any block keep a multiplier of 1. Streamed with
output_error (``stream``), the importances come from the same block-by-block pass's boundary states.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..options import QuantSpec
from ..units import Unit, find_blocks
from .base import Probe, Workload
from .output_error import OutputErrorProbe
from .table import SensitivityTable


def block_importance(workload: Workload, units: list[Unit]) -> dict[str, float]:
    """Block name -> 1 − mean cosine similarity between the block's input and output hidden states."""
    blocks = find_blocks(workload.model, units)
    sums = {name: 0.0 for name, _ in blocks}
    count = {"tokens": 0}

    def hook(name):
        def fn(module, args, output):
            h_in = args[0] if args else None
            h_out = output[0] if isinstance(output, (tuple, list)) else output
            if h_in is None or h_in.shape != h_out.shape:
                return
            sums[name] += float(F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum())
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in blocks]
    try:
        with torch.no_grad():
            for batch in workload.batches():
                (workload.run if hasattr(workload, "run") else workload.logits)(batch)
                count["tokens"] += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return {name: 1 - s / max(count["tokens"], 1) for name, s in sums.items()}


@torch.no_grad()
def streamed_block_importance(workload: Workload, units: list[Unit]) -> dict[str, float]:
    """``block_importance`` one decoder block at a time (alloc/models/stream.py): the same cosines, taken between
    the hidden state entering each block and the one leaving it."""
    stream = workload.stream(units)
    importance = {}
    with stream.resident():
        batches = list(workload.batches())
        tokens = sum(b.numel() for b in batches)
        hidden = [stream.inputs(b) for b in batches]
        for i, (name, _) in enumerate(stream.blocks):
            total = 0.0
            with stream.block_on_device(i):
                for k, (h, extra) in enumerate(hidden):
                    y = stream.run_block(i, h, extra)
                    total += float(F.cosine_similarity(h.float(), y.float(), dim=-1).sum())
                    hidden[k] = (y, extra)
            importance[name] = 1 - total / max(tokens, 1)
    return importance


@dataclass(frozen=True)
class BlockSimilarityProbe(Probe):
    name = "block_similarity"
    stream: str = "auto"                  # one decoder block at a time: auto, on, off

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        base = OutputErrorProbe(stream=self.stream).measure(workload, units, options)
        streamed = bool(base.meta.get("streamed"))
        importance = (streamed_block_importance if streamed else block_importance)(workload, units)
        scale = torch.ones(len(units), 1, dtype=torch.float64)
        for i, u in enumerate(units):
            for name, value in importance.items():
                if u.name.startswith(name + "."):
                    scale[i] = max(value, 0.0)
        return self.table(units, options, base.cost * scale, importance=importance,
                          **({"streamed": True} if streamed else {}))
