"""bitalloc: mixed-precision bit allocation — probe how sensitive each layer is, choose widths under a
budget of true bits per weight, quantize, pack and run. See docs/design.md for the flow.

The public names load on first use (PEP 562), so ``import bitalloc`` and ``bitalloc --help`` do not pay
for torch and transformers until a verb runs."""
from __future__ import annotations

import importlib

_PUBLIC = {
    "allocate": ".api", "measure": ".api", "prepare": ".api", "solve": ".api", "run_allocate": ".api",
    "AllocateConfig": ".config",
    "BitallocError": ".errors", "SettingError": ".errors",
    "save_gguf": ".ggml.checkpoint",
    "QuantSpec": ".options",
    "apply": ".packed",
    "BitPlan": ".plan",
    "Client": ".service.client",
    "Unit": ".units",
}

__all__ = list(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bitalloc' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
