"""Where each tensor of a model goes in its checkpoint on disk.

transformers 5 keeps an MoE layer's experts in 3-D parameters (``mlp.experts.gate_up_proj``: E × 2I × H) but
saves them, as the Hub and vLLM have them, one Linear per expert and projection
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``). ``disk_layout`` asks
transformers' own reverse conversion (what ``save_pretrained`` runs) where every row goes: it converts a
stand-in state dict whose entries hold their rows' ids instead of weights, and reads each disk tensor's ids
back as a run of rows of one parameter. The folder writers cut bitalloc's codes by those runs, so a
quantized expert lands under the name a loader of that format looks for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import BitallocError


@dataclass(frozen=True)
class Piece:
    """Disk tensor ``disk`` holds rows ``start:stop`` of parameter ``param`` (rows: every dimension but the
    last flattened, so expert e's row r of an (E, out, in) parameter is e·out + r); ``shape`` is its shape."""

    disk: str
    param: str
    start: int
    stop: int
    shape: tuple[int, ...]

    @property
    def module(self) -> str:
        return self.disk.removesuffix(".weight")

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This piece of ``tensor`` (the parameter, in any dtype), contiguous."""
        flat = tensor.reshape(-1) if tensor.dim() < 2 else tensor.reshape(-1, tensor.shape[-1])
        return flat[self.start:self.stop].reshape(self.shape).contiguous()


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without a head tied to the embeddings (the checkpoint stores it once)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen and name.endswith("lm_head.weight"):
            continue
        seen.add(t.data_ptr())
        out[name] = t
    return out


def disk_layout(model: nn.Module) -> dict[str, list[Piece]]:
    """{parameter or buffer name in memory: its pieces on disk, in row order}."""
    from transformers.core_model_loading import revert_weight_conversion
    ids, offsets = {}, []
    start = 0
    for name, t in state_tensors(model).items():
        lead = tuple(t.shape[:-1]) if t.dim() >= 2 else tuple(t.shape)
        rows = int(torch.tensor(lead, dtype=torch.int64).prod()) if lead else 1
        ids[name] = (torch.arange(rows, dtype=torch.int64) + start).reshape(*lead, *((1,) if t.dim() >= 2 else ()))
        offsets.append((start, name, t.shape[-1] if t.dim() >= 2 else None))
        start += rows
    from transformers import PreTrainedModel
    reverted = revert_weight_conversion(model, ids) if isinstance(model, PreTrainedModel) else ids
    firsts = torch.tensor([o[0] for o in offsets])
    layout: dict[str, list[Piece]] = {}
    for disk, t in reverted.items():
        flat = t.reshape(-1)
        if flat.numel() == 0:
            continue
        first = int(flat[0])
        i = int(torch.searchsorted(firsts, torch.tensor(first), right=True)) - 1
        base, param, last = offsets[i]
        end = offsets[i + 1][0] if i + 1 < len(offsets) else start
        if first + flat.numel() > end or not torch.equal(flat, torch.arange(first, first + flat.numel())):
            raise BitallocError(f"transformers saves {disk!r} as a reordering of {param!r}, which bitalloc cannot "
                                "write from its codes: use --format bitalloc")
        shape = tuple(t.shape[:-1]) + (last,) if last is not None else tuple(t.shape)
        layout.setdefault(param, []).append(Piece(disk, param, first - base, first - base + flat.numel(), shape))
    for pieces in layout.values():
        pieces.sort(key=lambda p: p.start)
    return layout
