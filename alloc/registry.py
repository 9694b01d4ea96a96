"""Name -> class registries with lazy imports, so ``import bitalloc`` stays light (no pulp, optuna, …)."""
from __future__ import annotations

import importlib
from typing import Any

from .errors import BitallocError

# name -> "module:Class"; the lists live here, torch-free, so the CLI lists them in its help without loading torch
PROBES: dict[str, str] = {
    "output_error": "bitalloc.sensitivity.output_error:OutputErrorProbe",
    "fisher": "bitalloc.sensitivity.fisher:FisherProbe",
    "kfac": "bitalloc.sensitivity.kfac:KFACProbe",
    "hessian_trace": "bitalloc.sensitivity.hessian_trace:HessianTraceProbe",
    "block_similarity": "bitalloc.sensitivity.output_similarity:BlockSimilarityProbe",
    "measured_kl": "bitalloc.sensitivity.measured_kl:MeasuredKLProbe",
}
ROW_PROBES = ("fisher", "kfac", "output_error")      # the probes with per-row costs (Probe.gives_rows; a test checks)
BLIND_TO_EXPERTS = ("kfac", "output_error")   # read inputs by hooks: cannot measure MoE experts (base.refuse_experts)
SOLVERS: dict[str, str] = {
    "uniform": "bitalloc.solvers.uniform:UniformSolver",
    "ilp": "bitalloc.solvers.ilp:ILPSolver",
    "closed_form": "bitalloc.solvers.closed_form:ClosedFormSolver",
    "evolutionary": "bitalloc.solvers.evolutionary:EvolutionarySolver",
    "optuna": "bitalloc.solvers.optuna_search:OptunaSolver",
}
NEEDS_MODEL = ("evolutionary", "optuna")     # these score whole plans on the model (alloc/fitness.py)
ROW_SOLVERS = ("closed_form", "greedy", "ilp")   # solvers/rows.py


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
