"""SensitivityTable: units × options -> predicted cost (loss increase), the input of every solver.

Saved as a safetensors file (the cost matrix) plus a JSON sidecar (units, options, which probe made it on
which model and data), or as CSV with one row per unit × option:
``unit,bits,group_size,symmetric,cost,size_bits,out_features,in_features,fused_group,ggml`` (ggml: the
llama.cpp type of a ``--options ggml`` option, else empty).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import BitallocError
from ..files import atomic_path, atomic_write_text
from ..options import QuantSpec
from ..units import Unit

CSV_COLUMNS = ["unit", "bits", "group_size", "symmetric", "cost", "size_bits", "out_features", "in_features",
               "fused_group", "ggml"]


@dataclass
class SensitivityTable:
    units: list[Unit]
    options: list[QuantSpec]
    cost: torch.Tensor                      # (U, O) float64: predicted loss increase
    meta: dict[str, Any] = field(default_factory=dict)
    # (R, O) float64, R = the units' output rows one after another: the cost of each row under each option,
    # for probes that can split their cost by row (fisher, output_error); each unit's rows sum to its cost.
    row_cost: torch.Tensor | None = None
    # what solvers derive from the costs alone and keep for the next budget (solvers/rows.py: the row knapsack)
    derived: dict = field(default_factory=dict, repr=False, compare=False)
    # each unit's input XᵀX / tokens as the probe collected it (kfac), for GPTQ in the checks of the same
    # process: kept in memory only (never saved), and only while small (sensitivity/kfac.py KEEP_GRAMS_BYTES)
    grams: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.cost = torch.as_tensor(self.cost, dtype=torch.float64)
        if self.cost.shape != (len(self.units), len(self.options)):
            raise BitallocError(f"cost table is {tuple(self.cost.shape)}, expected (units, options) = "
                                f"({len(self.units)}, {len(self.options)})")
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise BitallocError(f"the table lists unit(s) {dup[:3]} more than once: keep one row per unit × option")
        if not torch.isfinite(self.cost).all():
            bad = [self.units[i].name for i in torch.nonzero(~torch.isfinite(self.cost))[:, 0].unique().tolist()]
            raise BitallocError(f"the table has NaN/Inf costs for {bad[:3]}: re-run the probe")
        if (self.cost < 0).any():
            bad = [self.units[i].name for i in torch.nonzero(self.cost < 0)[:, 0].unique().tolist()]
            raise BitallocError(f"the table has negative costs for {bad[:3]}: costs are loss increases, clamp them at 0")
        if self.row_cost is not None:
            self.row_cost = torch.as_tensor(self.row_cost, dtype=torch.float64)
            rows = sum(u.shape[0] for u in self.units)
            if self.row_cost.shape != (rows, len(self.options)):
                raise BitallocError(f"row costs are {tuple(self.row_cost.shape)}, expected (rows, options) = "
                                    f"({rows}, {len(self.options)})")
            if not torch.isfinite(self.row_cost).all() or (self.row_cost < 0).any():
                raise BitallocError("the table has NaN/Inf or negative row costs: re-run the probe")

    def row_offsets(self) -> list[int]:
        """Where each unit's rows start in ``row_cost`` (U + 1 entries, the last is R)."""
        out = [0]
        for u in self.units:
            out.append(out[-1] + u.shape[0])
        return out

    def rows_of(self, i: int) -> torch.Tensor:
        """(out, O) row costs of unit ``i`` (the table must have row costs)."""
        if self.row_cost is None:
            raise BitallocError(f"the {self.probe} table has no row costs: use a probe that gives them (fisher, "
                                "kfac, output_error) or --granularity layer")
        off = self.row_offsets()
        return self.row_cost[off[i]:off[i + 1]]

    def plan_extra(self) -> dict:
        """What a plan made from this table records of how its units were chosen (include/exclude/experts),
        so that apply and eval find the same units (packed.planned_units)."""
        scope = self.meta.get("scope")
        return {"scope": scope} if isinstance(scope, dict) else {}

    @property
    def probe(self) -> str:
        return self.meta.get("probe", "unknown")

    def sizes(self, *, count_overhead: bool = True) -> torch.Tensor:
        """(U, O) float64 storage bits of each unit under each option."""
        return torch.tensor([[o.size_bits(u.shape, count_overhead=count_overhead) for o in self.options]
                             for u in self.units], dtype=torch.float64)

    def numels(self) -> torch.Tensor:
        return torch.tensor([u.numel for u in self.units], dtype=torch.float64)

    # -- safetensors + JSON sidecar ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` (safetensors) and ``path + '.json'`` (sidecar)."""
        from safetensors.torch import save_file
        path = Path(path)
        with atomic_path(path) as tmp:
            tensors = {"cost": self.cost.contiguous()}
            if self.row_cost is not None:
                tensors["row_cost"] = self.row_cost.contiguous()
            save_file(tensors, str(tmp))
        atomic_write_text(str(path) + ".json", json.dumps({
            "format": "bitalloc.table", "version": 1, "meta": self.meta,
            "units": [u.to_json() for u in self.units],
            "options": [o.to_json() for o in self.options]}, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SensitivityTable":
        from safetensors.torch import load_file
        side = json.loads(Path(str(path) + ".json").read_text())
        tensors = load_file(str(path))
        units = [Unit.from_json(u) for u in side["units"]]
        options = [QuantSpec(**o) for o in side["options"]]
        return cls(units, options, tensors["cost"], side.get("meta", {}), tensors.get("row_cost"))

    # -- CSV ----------------------------------------------------------------------------------------------
    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        sizes = self.sizes()
        for i, u in enumerate(self.units):
            for j, o in enumerate(self.options):
                writer.writerow([u.name, o.bits, o.group_size, str(o.symmetric).lower(), repr(float(self.cost[i, j])),
                                 int(sizes[i, j]), u.shape[0], u.shape[1], u.fused_group or "", o.ggml])
        return buf.getvalue()

    def save_csv(self, path: str | os.PathLike) -> None:
        """The CSV, and beside it ``path + '.json'``: the model and unit scope it was measured on, so that a plan
        solved from the CSV names its model (what apply and eval check)."""
        atomic_write_text(path, self.to_csv())
        side = {k: self.meta[k] for k in ("model", "scope", "probe") if k in self.meta}
        if side:
            atomic_write_text(str(path) + ".json", json.dumps({"format": "bitalloc.table-csv-meta", "version": 1,
                                                               "meta": side}, indent=1))

    @classmethod
    def load_csv(cls, path: str | os.PathLike) -> "SensitivityTable":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BitallocError(f"table {str(path)!r} does not exist: write one with `bitalloc probe --out`") from None
        except IsADirectoryError:
            raise BitallocError(f"table {str(path)!r} is a directory: give a table CSV") from None
        except UnicodeDecodeError:
            raise BitallocError(f"table {str(path)!r} is not a text CSV: give a table from `bitalloc probe --out`") from None
        if text.lstrip().startswith("{"):
            raise BitallocError(f"table {str(path)!r} is JSON (a plan?), not a table CSV: give a table from "
                                "`bitalloc probe --out`")
        rows = list(csv.DictReader(io.StringIO(text)))
        need = {"unit", "bits", "group_size", "cost", "size_bits", "out_features", "in_features"}
        if not rows or not need <= set(rows[0]):
            have = sorted(rows[0]) if rows else []
            raise BitallocError(f"table {str(path)!r} needs columns {sorted(need)}, has {have}")
        units: dict[str, Unit] = {}
        costs: dict[tuple[str, QuantSpec], float] = {}
        for line, row in enumerate(rows, start=2):
            try:
                spec = QuantSpec(int(row["bits"]), int(row["group_size"]),
                                 row.get("symmetric", "false").strip().lower() == "true", (row.get("ggml") or "").strip())
                cost = float(row["cost"])
                shape = (int(row["out_features"]), int(row["in_features"]))
            except (ValueError, TypeError):
                raise BitallocError(f"table {str(path)!r} line {line}: bits/group_size/cost/shape must be numbers") from None
            if not math.isfinite(cost) or cost < 0:
                raise BitallocError(f"table {str(path)!r} line {line}: cost {row['cost']} for {row['unit']} is "
                                    "negative or NaN: costs are loss increases ≥ 0")
            name = row["unit"]
            if (name, spec) in costs:
                raise BitallocError(f"table {str(path)!r} line {line}: unit {name!r} has option {spec.label()} twice")
            units.setdefault(name, Unit(name, shape, "linear", row.get("fused_group") or None))
            try:
                size_bits = float(row["size_bits"])     # "35072" or "35072.0" (spreadsheets write floats)
            except (ValueError, TypeError):
                raise BitallocError(f"table {str(path)!r} line {line}: size_bits {row['size_bits']!r} is not a "
                                    "number") from None
            if size_bits != spec.size_bits(shape):
                raise BitallocError(f"table {str(path)!r} line {line}: size_bits {row['size_bits']} is not what "
                                    f"{spec.label()} on {shape} takes ({spec.size_bits(shape)})")
            costs[(name, spec)] = cost
        options = sorted({spec for _, spec in costs})
        missing = [(n, o.label()) for n in units for o in options if (n, o) not in costs]
        if missing:
            raise BitallocError(f"table {str(path)!r} lacks options for some units, e.g. {missing[:3]}: every unit "
                                "needs a row for every option")
        cost = torch.tensor([[costs[(n, o)] for o in options] for n in units], dtype=torch.float64)
        meta = {"probe": "csv", **_csv_meta(path), "source": str(path)}
        return cls(list(units.values()), options, cost, meta)


def _csv_meta(path) -> dict:
    """The sidecar save_csv writes beside a table CSV (model, scope, probe); {} when absent or unreadable."""
    try:
        side = json.loads(Path(str(path) + ".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    meta = side.get("meta") if isinstance(side, dict) and side.get("format") == "bitalloc.table-csv-meta" else None
    return {k: v for k, v in meta.items() if k in ("model", "scope", "probe")} if isinstance(meta, dict) else {}
