"""Which model a plan belongs to, checked wherever a plan meets a model (``apply``, ``eval``).

A plan records its model's content hash (models/loading.py) and a fingerprint of each unit's weights: the
root mean square and a signed projection of 4,096 evenly spaced entries on a fixed ±1 pattern. The hash is
exact but depends on the dtype the model was read in; the fingerprint survives another dtype (bf16 rounding
moves the projection by ~0.002) and still tells a negated, shuffled or other matrix (it moves by ~1).
"""
from __future__ import annotations

import copy
import warnings

from torch import nn

from .errors import BitallocError, BitallocWarning, few
from .models.identity import fingerprint, model_info

RMS_RTOL = 1e-2
Z_ATOL = 0.05


def differing(recorded: dict, current: dict) -> list[str]:
    """Units whose fingerprints differ (by name; a unit the plan has and the model lacks counts)."""
    bad = []
    for name, (rms, z) in recorded.items():
        if name not in current:
            bad.append(name)
            continue
        rms2, z2 = current[name]
        if abs(rms - rms2) > RMS_RTOL * max(abs(rms), 1e-30) or abs(z - z2) > Z_ATOL:
            bad.append(name)
    return bad


def check_plan_model(plan, model: nn.Module, units, info: dict | None = None, *, force: bool = False,
                     what: str = "apply"):
    """``plan`` if it was made for ``model``; else a one-line refusal (``force``: a copy of the plan naming this
    model, the one it was made for recorded under extra["forced"], and a warning). ``info``: the model's
    model_info when already computed (its hash). A plan that records no model is used with a warning."""
    made = plan.model or {}
    if not made.get("hash"):
        warnings.warn(f"the plan records no model (hand-made, or from an old table CSV): {what} cannot check it "
                      "was made for this one", BitallocWarning, stacklevel=3)
        return plan
    by_name = {u.name: u for u in units}
    info = info or model_info(model)
    problem = None
    if made.get("hash") and made["hash"] != info.get("hash"):
        problem = f"its model hash {made['hash']} is not this model's {info['hash']}"
    if problem and made.get("fingerprint") and made.get("dtype") != info.get("dtype"):
        # read in another dtype, so the hash cannot agree: compare the planned layers' weights instead
        recorded = {n: made["fingerprint"][n] for n in plan.layers if n in made["fingerprint"]}
        planned = [by_name[n] for n in recorded if n in by_name]
        bad = differing(recorded, fingerprint(model, planned))
        problem = f"the weights of {len(bad)} of its {len(recorded)} layers differ from this model's ({few(bad)})" \
            if bad or not recorded else None
    if problem is None:
        return plan
    message = f"the plan was made for another model ({made.get('id', 'unnamed')}): {problem}"
    if not force:
        raise BitallocError(f"{message}; give the model it was made for, or --force to {what} it anyway")
    warnings.warn(f"{message}; --force: {what} goes on and records this", BitallocWarning, stacklevel=3)
    plan = copy.deepcopy(plan)
    plan.extra["forced"] = {"made_for": made, "reason": problem}
    plan.model = {**model_info(model, [by_name[n] for n in plan.layers if n in by_name])}
    return plan
