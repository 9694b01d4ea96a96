"""Up-front checks of what a user hands us (CLI arguments and API arguments alike).

Each check raises a one-line BitallocError that names the problem and the fix, before any slow work starts
and before anything is written.
"""
from __future__ import annotations

import importlib.util
import math
import numbers
import os
from pathlib import Path

from .errors import BitallocError, SettingError
from .files import check_parent


def count(value, name: str) -> int:
    """A whole number ≥ 1 (windows, tokens, trials, …)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SettingError(name, f"{{name}} must be a whole number ≥ 1, got {value!r}")
    if value < 1:
        raise SettingError(name, f"{{name}} is {value}: give a whole number ≥ 1")
    return int(value)


def positive(value, name: str, *, allow_none: bool = False) -> float | None:
    """A finite real number > 0 (seconds, budgets)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingError(name, f"{{name}} must be a number, got {value!r} ({type(value).__name__}): e.g. 3.2")
    if not math.isfinite(value) or value <= 0:
        raise SettingError(name, f"{{name}} is {value}: give a finite number > 0")
    return float(value)


def budget(value) -> float:
    """Bits per weight: a finite number > 0 (whether a plan can meet it is the solver's question)."""
    return positive(value, "budget_bits")


def feasible(budget_bits: float, options, *, count_overhead: bool = True) -> None:
    """Refuse, before any model loads, a budget below what the cheapest option takes on any matrix (its bits
    per weight on a large matrix whose rows fill whole groups: a lower bound; the solver checks the exact one)."""
    shape = (4096, 4096 * 8)
    floor = min(o.size_bits(shape, count_overhead=count_overhead) for o in options) / (shape[0] * shape[1])
    if budget_bits < floor - 1e-12:
        raise SettingError("budget_bits", f"budget {budget_bits} bits per weight is infeasible: the cheapest option "
                                          f"takes at least {floor:.4f}; give {{name}} ≥ {math.ceil(floor * 10000) / 10000}")


def output_file(path, flag: str = "--out") -> Path:
    """A file we may create or replace: its folder exists and is writable, and it is not itself a folder."""
    if path is None or str(path) == "":
        raise BitallocError(f"{flag} is empty: give a file name")
    path = Path(path)
    if path.is_dir():
        raise BitallocError(f"{flag} {str(path)!r} is a directory: give a file name, e.g. {path / 'plan.json'}")
    parent = check_parent(path, flag).parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitallocError(f"output directory {str(parent)!r} is not writable: choose another {flag}")
    if path.exists() and not os.access(path, os.W_OK):
        raise BitallocError(f"{flag} {str(path)!r} exists and is read-only: choose another name")
    return path


def output_folder(path, flag: str = "--out-dir") -> Path:
    """A folder we may create or write into (sweep's --out-dir): not a file, its parent exists."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BitallocError(f"{flag} {str(path)!r} is a file: give a folder name")
    parent = check_parent(path, flag).parent
    if not os.access(path if path.is_dir() else parent, os.W_OK | os.X_OK):
        raise BitallocError(f"{flag} {str(path)!r} is not writable: choose another folder")
    return path


def input_file(path, flag: str, what: str = "file") -> Path:
    """A readable file (not a folder) that exists."""
    path = Path(path)
    if not path.exists():
        raise BitallocError(f"{flag} {str(path)!r} does not exist: give an existing {what}")
    if path.is_dir():
        raise BitallocError(f"{flag} {str(path)!r} is a directory: give a {what}")
    if not os.access(path, os.R_OK):
        raise BitallocError(f"{flag} {str(path)!r} is not readable: check its permissions")
    return path


def require(module: str, extra: str | None, purpose: str, package: str | None = None) -> None:
    """Refuse up front, in one line, when a dependency is missing: ``extra`` names the bitalloc extra that brings
    it (None: it is in the base install, and ``package`` is the name to pip install)."""
    if importlib.util.find_spec(module) is None:
        fix = f'pip install "bitalloc[{extra}]"' if extra else f"pip install {package or module}"
        raise BitallocError(f"{purpose} needs the Python package {module!r}, which is not installed: {fix}")


def one_of(value, choices, name: str, why: str = "") -> str:
    """``value`` if it is one of ``choices``; else a SettingError naming setting ``name`` (``why``: e.g. "for
    granularity row")."""
    if value not in choices:
        why = f" {why}" if why else ""
        raise SettingError(name, f"unknown {{name}} {value!r}{why}: choose one of {', '.join(choices)}")
    return value
