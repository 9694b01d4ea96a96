"""Name -> class registries with lazy imports, so ``import bitalloc`` stays light (no pulp, optuna, …)."""
from __future__ import annotations

import importlib
from typing import Any

from .errors import BitallocError


def instantiate(registry: dict[str, str], kind: str, name: str, settings: dict[str, Any]) -> Any:
    """``registry`` maps a name to "module:Class"; build that class with ``settings`` or explain the mistake."""
    if name not in registry:
        raise BitallocError(f"unknown {kind} {name!r}: choose one of {', '.join(registry)}")
    module_name, _, cls_name = registry[name].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        return cls(**settings)
    except TypeError as e:
        raise BitallocError(f"{kind} {name!r}: {e}") from None
