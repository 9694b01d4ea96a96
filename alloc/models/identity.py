"""Which model this is: a content hash of its weights, what a plan records of it, and each unit's weight
fingerprint (what ``apply`` and ``eval`` check a plan against, alloc/provenance.py)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import nn

from ..units import unit_weight

SAMPLES = 4096


def _pattern(k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20261202)
    return torch.randint(0, 2, (k,), generator=g, dtype=torch.float64) * 2 - 1


def fingerprint(model: nn.Module, units) -> dict[str, list[float]]:
    """unit name -> [rms, z] of its weight."""
    modules = dict(model.named_modules())
    out, pattern = {}, _pattern(SAMPLES)
    for u in units:
        w = unit_weight(modules, u).detach().reshape(-1)
        rms = float(torch.linalg.vector_norm(w, dtype=torch.float32)) / math.sqrt(max(w.numel(), 1))
        k = min(SAMPLES, w.numel())
        # float32 positions (as plans record them); past 2**24 weights the last one rounds past the end: clamp
        x = w[torch.linspace(0, w.numel() - 1, k).long().clamp(max=w.numel() - 1)].double()
        scale = float(x.pow(2).mean().sqrt()) * math.sqrt(k)
        z = float((x * pattern[:k]).sum()) / scale if scale > 0 else 0.0
        out[u.name] = [float(f"{rms:.6g}"), round(z, 4)]
    return out


def model_hash(model: nn.Module) -> str:
    """Content hash of every parameter and buffer (names, shapes, dtypes and bytes), in their own dtype:
    the bytes are hashed in place, no copy of the model is made."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_info(model: nn.Module, units=None) -> dict:
    """What a plan records of its model: id (folder or GGUF file name), content hash (of a GGUF: of the file
    and the dtype it was read in), architecture, and the path only when the user gave one, exactly as given
    (never the install location of the default model); with ``units``, each one's weight fingerprint
    (alloc/provenance.py: what ``apply`` and ``eval`` check a plan against)."""
    source = getattr(model, "name_or_path", "") or ""
    given = getattr(model, "bitalloc_given_path", source if source and Path(source).is_dir() else None)
    info = {"id": Path(source).name if source else type(model).__name__,
            "architecture": type(model).__name__,
            "hash": getattr(model, "bitalloc_file_hash", None) or model_hash(model),
            "dtype": str(next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32))}
    if given:
        info["path"] = given
    if units is not None:
        info["fingerprint"] = fingerprint(model, units)
    return info
