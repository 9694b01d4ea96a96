"""BitPlan: the ordered map layer name -> QuantSpec that every solver returns, with a versioned JSON form.

    {"format": "bitalloc.plan", "version": 1, "model": {...}, "budget_bits": 3.2, "true_bpw": 3.19,
     "nominal_bpw": 3.05, "solver": "ilp", "probe": "fisher", "objective": 0.12,
     "layers": {"model.layers.0.self_attn.q_proj": {"bits": 3, "group_size": 128, "symmetric": false,
                                                    "shape": [384, 384], "cost": 9.4e-07}, ...}}

``true_bpw`` counts codes + scales + zeros (kernels/pack.py); ``nominal_bpw`` counts codes only. Both are
derived from the layers and recomputed on load, so a hand-edited plan always reports what it really costs.
``cost`` (optional) is the probe's cost of the chosen width, kept so that ``plan.table()`` can show it.

Version 2 adds per-row plans: a layer may give ``"row_bits": "3343…"`` (one digit per output row, in row
order) instead of ``"bits"``. Rows of equal width are stored together (kernels/pack.py ``mixed_size_bits``),
so a row plan's true bits are exact too. Version 1 files still load.
"""
from __future__ import annotations

import json
import math
import re
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .errors import BitallocError, BitallocWarning, few
from .files import atomic_write_text
from .kernels.pack import SUPPORTED_BITS, mixed_size_bits
from .options import QuantSpec
from .units import Unit

FORMAT = "bitalloc.plan"
VERSION = 2


@dataclass
class BitPlan:
    layers: dict[str, QuantSpec]
    shapes: dict[str, tuple[int, int]]
    budget_bits: float | None = None
    solver: str = "manual"
    probe: str = "none"
    objective: float | None = None
    model: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)    # layer -> the probe's cost of its chosen width
    row_bits: dict[str, torch.Tensor] = field(default_factory=dict)   # layer -> (out,) int8 width of each row

    def __post_init__(self) -> None:
        for name, rb in list(self.row_bits.items()):
            rb = torch.as_tensor(rb, dtype=torch.int8).reshape(-1)
            spec, shape = self.layers[name], self.shapes[name]
            if rb.numel() != shape[0]:
                raise BitallocError(f"layer {name!r}: row_bits has {rb.numel()} rows, the layer {shape[0]}")
            bad = sorted(set(rb.tolist()) - set(SUPPORTED_BITS))
            if bad:
                raise BitallocError(f"layer {name!r}: row width(s) {bad} cannot be stored: use {list(SUPPORTED_BITS)}")
            if int(rb.min()) == int(rb.max()):      # one width after all: an ordinary layer
                self.layers[name] = QuantSpec(int(rb[0]), spec.group_size, spec.symmetric)
                del self.row_bits[name]
            else:
                self.layers[name] = QuantSpec(int(rb.max()), spec.group_size, spec.symmetric)
                self.row_bits[name] = rb

    # -- derived figures -------------------------------------------------------------------------------
    def layer_size_bits(self, name: str, *, count_overhead: bool = True) -> int:
        """Bits layer ``name`` takes: its format's, or for a row plan each width's segment plus the row order."""
        spec, shape = self.layers[name], self.shapes[name]
        rb = self.row_bits.get(name)
        if rb is None:
            return spec.size_bits(shape, count_overhead=count_overhead)
        if not count_overhead:
            return int(rb.long().sum()) * shape[1]
        return mixed_size_bits(rb, shape[1], spec.group_size, spec.symmetric)

    def _bits(self, count_overhead: bool) -> float:
        return sum(self.layer_size_bits(n, count_overhead=count_overhead) for n in self.layers)

    @property
    def n_params(self) -> int:
        return sum(s[0] * s[1] for s in self.shapes.values())

    @property
    def true_bpw(self) -> float:
        return self._bits(True) / self.n_params

    @property
    def nominal_bpw(self) -> float:
        return self._bits(False) / self.n_params

    def size_bytes(self) -> float:
        """Bytes the quantized layers take when packed."""
        return self._bits(True) / 8

    def __repr__(self) -> str:
        """One line: layers, budget, true and nominal bpw, and the share of weights at each width."""
        hist = self.bits_histogram()
        shares = ", ".join(f"{b}: {100 * n / max(self.n_params, 1):.0f} %" for b, n in hist.items())
        budget = f"budget {self.budget_bits:g}, " if self.budget_bits is not None else ""
        return (f"BitPlan({len(self.layers)} layers, {budget}true {self.true_bpw:.4f} bpw, nominal "
                f"{self.nominal_bpw:.4f}, widths {{{shares}}}, solver {self.solver}, probe {self.probe})")

    def bits_histogram(self) -> dict[int, int]:
        """bits -> number of parameters stored at that width."""
        hist: dict[int, int] = {}
        for name, spec in self.layers.items():
            for bits, rows in self.row_widths(name).items():
                hist[bits] = hist.get(bits, 0) + rows * self.shapes[name][1]
        return dict(sorted(hist.items()))

    def row_widths(self, name: str) -> dict[int, int]:
        """width -> number of output rows at that width, for one layer."""
        rb = self.row_bits.get(name)
        if rb is None:
            return {self.layers[name].bits: self.shapes[name][0]}
        counts = torch.bincount(rb.long(), minlength=17)
        return {b: int(counts[b]) for b in range(counts.numel()) if counts[b] > 0}

    def format_label(self, name: str) -> str:
        """W3g128, or for a row plan the widths it mixes: W2/3/4g128."""
        spec = self.layers[name]
        if name not in self.row_bits:
            return spec.label()
        widths = "/".join(str(b) for b in self.row_widths(name))
        return spec.label().replace(f"W{spec.bits}", f"W{widths}", 1)

    def table(self) -> list[dict[str, Any]]:
        """One row per layer: layer, params, format (e.g. W3g128), bpw (true), cost (None when unknown)."""
        return [{"layer": n, "params": self.shapes[n][0] * self.shapes[n][1], "format": self.format_label(n),
                 "bpw": self.layer_size_bits(n) / (self.shapes[n][0] * self.shapes[n][1]), "cost": self.costs.get(n)}
                for n in self.layers]

    def table_lines(self) -> list[str]:
        """``table()`` as aligned text lines, header first (what ``bitalloc allocate`` prints)."""
        rows = self.table()
        width = max(len("layer"), *(len(r["layer"]) for r in rows))
        lines = [f"{'layer':<{width}}  {'params':>9}  {'format':>8}  {'bpw':>6}  {'cost':>10}"]
        for r in rows:
            cost = f"{r['cost']:.4g}" if r["cost"] is not None else "-"
            lines.append(f"{r['layer']:<{width}}  {r['params']:>9,}  {r['format']:>8}  {r['bpw']:>6.3f}  {cost:>10}")
        return lines

    @classmethod
    def from_choice(cls, units: Iterable[Unit], specs: Iterable[QuantSpec], **meta: Any) -> "BitPlan":
        units = list(units)
        return cls(layers={u.name: s for u, s in zip(units, specs)}, shapes={u.name: u.shape for u in units}, **meta)

    # -- JSON --------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION if self.row_bits else 1,     # layer plans stay readable by older bitalloc
            "model": self.model,
            "budget_bits": self.budget_bits,
            "true_bpw": round(self.true_bpw, 6),
            "nominal_bpw": round(self.nominal_bpw, 6),
            "solver": self.solver,
            "probe": self.probe,
            "objective": self.objective,
            **({"extra": self.extra} if self.extra else {}),
            "layers": {n: self._layer_json(n) for n in self.layers},
        }

    def _layer_json(self, name: str) -> dict[str, Any]:
        entry = {**self.layers[name].to_json(), "shape": list(self.shapes[name])}
        if name in self.row_bits:
            del entry["bits"]
            entry = {"row_bits": _digits(self.row_bits[name]), **entry}
        if name in self.costs:
            entry["cost"] = self.costs[name]
        return entry

    def dumps(self) -> str:
        """The plan file's text (what ``save`` writes and the service returns)."""
        text = json.dumps(self.to_json(), indent=1)
        # short lists of numbers (shapes, weight fingerprints) on one line each
        text = re.sub(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]",
                      lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
        return text + "\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, self.dumps())

    @classmethod
    def from_json(cls, data: Any, *, source: str = "plan") -> "BitPlan":
        """Validate every field; raise BitallocError naming the first bad one."""
        def bad(what: str) -> BitallocError:
            return BitallocError(f"{source}: {what}")

        if not isinstance(data, dict):
            raise bad("is not a JSON object: expected a bitalloc plan")
        if data.get("format") != FORMAT:
            raise bad(f"'format' is {data.get('format')!r}, not {FORMAT!r}: this is not a bitalloc plan")
        version = data.get("version")
        if not _is_int(version) or version < 1:
            raise bad(f"'version' must be a positive integer, got {version!r}")
        if version > VERSION:
            raise bad(f"plan format version {version} is newer than this bitalloc reads ({VERSION}): upgrade bitalloc")
        budget = data.get("budget_bits")
        if budget is not None and not _is_number(budget):
            raise bad(f"'budget_bits' must be a number or null, got {budget!r}")
        for key in ("true_bpw", "nominal_bpw"):
            if key in data and not _is_number(data[key]):
                raise bad(f"{key!r} must be a number, got {data[key]!r}")
        for key in ("solver", "probe"):
            if not isinstance(data.get(key, ""), str):
                raise bad(f"{key!r} must be a string, got {data[key]!r}")
        objective = data.get("objective")
        if objective is not None and not _is_number(objective):
            raise bad(f"'objective' must be a number or null, got {objective!r}")
        model = data.get("model", {})
        if not isinstance(model, dict):
            raise bad(f"'model' must be an object, got {model!r}")
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise bad(f"'extra' must be an object, got {extra!r}")
        layers = data.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise bad("'layers' must be a non-empty object mapping layer names to {bits, group_size, symmetric}")
        specs, shapes, costs, row_bits = {}, {}, {}, {}
        for name, entry in layers.items():
            if not isinstance(entry, dict):
                raise bad(f"layer {name!r} must be an object with bits, group_size, symmetric; got {entry!r}")
            if "row_bits" in entry:
                rb = entry["row_bits"]
                if "bits" in entry:
                    raise bad(f"layer {name!r} gives both 'bits' and 'row_bits': keep one")
                if not (isinstance(rb, str) and rb.isascii() and rb.isdigit()):
                    raise bad(f"layer {name!r}: 'row_bits' must be a string of digits (one width per output row)")
                entry = {**entry, "bits": max(int(c) for c in rb)}
            for key, check, kind in (("bits", _is_int, "an integer"), ("group_size", _is_int, "an integer"),
                                     ("symmetric", lambda v: isinstance(v, bool), "true or false")):
                if key not in entry:
                    raise bad(f"layer {name!r} lacks {key!r}")
                if not check(entry[key]):
                    raise bad(f"layer {name!r}: {key!r} must be {kind}, got {entry[key]!r}")
            shape = entry.get("shape")
            if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
                raise bad(f"layer {name!r}: 'shape' must be [out_features, in_features], got {shape!r}")
            try:
                specs[name] = QuantSpec(entry["bits"], entry["group_size"], entry["symmetric"],
                                        str(entry.get("ggml", "") or ""))
            except BitallocError as e:
                raise bad(f"layer {name!r}: {e}") from None
            shapes[name] = (shape[0], shape[1])
            if "row_bits" in entry:
                if len(entry["row_bits"]) != shape[0]:
                    raise bad(f"layer {name!r}: 'row_bits' has {len(entry['row_bits'])} digits for {shape[0]} rows: "
                              "give one width per output row")
                widths = {int(c) for c in entry["row_bits"]}
                if not widths <= set(SUPPORTED_BITS):
                    raise bad(f"layer {name!r}: row width(s) {sorted(widths - set(SUPPORTED_BITS))} cannot be "
                              f"stored: use {list(SUPPORTED_BITS)}")
                row_bits[name] = torch.tensor([int(c) for c in entry["row_bits"]], dtype=torch.int8)
            if "cost" in entry:
                if not _is_number(entry["cost"]):
                    raise bad(f"layer {name!r}: 'cost' must be a number, got {entry['cost']!r}")
                costs[name] = float(entry["cost"])
        plan = cls(specs, shapes, budget_bits=budget, solver=data.get("solver", "manual"),
                   probe=data.get("probe", "none"), objective=objective, model=model, extra=extra, costs=costs,
                   row_bits=row_bits)
        if budget is not None and plan.true_bpw > budget + 1e-9:
            warnings.warn(f"{source}: its layers take {plan.true_bpw:.4f} true bits per weight, over its budget "
                          f"{budget}", BitallocWarning, stacklevel=2)
        return plan

    @classmethod
    def load(cls, path: str | os.PathLike, *, units: list[Unit] | None = None) -> "BitPlan":
        try:
            text = open(path, encoding="utf-8").read()
        except FileNotFoundError:
            raise BitallocError(f"plan file {str(path)!r} does not exist: give the path of a saved plan") from None
        except (UnicodeDecodeError, IsADirectoryError):
            raise BitallocError(f"plan file {str(path)!r} is not a JSON text file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BitallocError(f"plan file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}): "
                                "re-save it with bitalloc") from None
        plan = cls.from_json(data, source=f"plan {str(path)!r}")
        if units is not None:
            plan.check_units(units)
        return plan

    def check_units(self, units: list[Unit]) -> None:
        """Refuse a plan made for another model: name the unknown, missing or reshaped layers."""
        by_name = {u.name: u for u in units}
        unknown = [n for n in self.layers if n not in by_name]
        if unknown:
            raise BitallocError(f"plan names {len(unknown)} layer(s) this model does not have ({few(unknown)}): "
                                "it was made for another model")
        missing = [u.name for u in units if u.name not in self.layers]
        if missing:
            raise BitallocError(f"plan lacks {len(missing)} layer(s) of this model ({few(missing)}): "
                                "a plan covers every unit of its model; keep layers in full precision with "
                                "--exclude when making the plan (or it was made for another model)")
        reshaped = [n for n in self.layers if tuple(by_name[n].shape) != tuple(self.shapes[n])]
        if reshaped:
            raise BitallocError(f"plan shapes differ from the model's for {few(reshaped)}: it was made for another model")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _digits(row_bits: torch.Tensor) -> str:
    """One digit per row ("3324…"): widths are 1–9 bits."""
    return (row_bits.to(torch.uint8) + ord("0")).numpy().tobytes().decode("ascii")
