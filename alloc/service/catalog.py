"""What the service knows, over the store: registered models, stored tables, solved plans.

Every step calls the verbs of alloc/api.py (``prepare``/``measure`` on workers, ``solve`` here); nothing
here measures or solves by itself.

    register_model(store, root, path)     load once under --models-root: hash, architecture, units
    table_request(model, request)         the request fields a table depends on, normalized; its key
    stored_table(store, job)              the table a finished job wrote (kept in memory, 8 at most)
    solve_plan(store, model, table_row, request)   BitPlan from a stored table, saved as a plan row
"""
from __future__ import annotations

import hashlib
import math
import json
import threading
from collections import OrderedDict
from pathlib import Path

from sqlalchemy import select

from .errors import Conflict, Forbidden, Unprocessable
from .store import ModelRow, PlanRow, Store, TableRow, new_id

EMBEDDED = "@embedded"            # the path of the model that ships with bitalloc (refllama-s)

# the fields of a plan request that choose the table, with allocate's defaults
TABLE_FIELDS = {"probe": "fisher", "quantizer": "rtn", "options": None, "group_size": 128, "symmetric": False,
                "experts": "per-expert", "n_windows": 128, "seq_len": 512, "dtype": "auto"}


# -- models ---------------------------------------------------------------------------------------------
def resolve_path(root: Path, path: str) -> Path:
    """``path`` (relative to ``root``, or absolute inside it) as a real path inside ``root``; 403 otherwise:
    ``..``, a symlink that leads out, an absolute path elsewhere."""
    if not isinstance(path, str) or not path.strip():
        raise Unprocessable("path: give a model folder or .gguf file under the server's --models-root")
    if ".." in Path(path).parts:
        raise Forbidden(f"path {path!r} contains '..': give a path under the server's --models-root")
    root = root.resolve()
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        raise Forbidden(f"path {path!r} is outside the server's --models-root {root}: copy or link the model there")
    return full


def model_path(root: Path, row: ModelRow) -> Path:
    if row.path == EMBEDDED:
        from ..models.loading import default_model_path
        return default_model_path()
    return resolve_path(root, row.path)


def _describe(path) -> dict:
    from ..models.loading import load_model, model_info
    from ..units import find_units
    model, _, _ = load_model(path)
    units = find_units(model)
    info = model_info(model, units)
    return {"hash": info["hash"], "architecture": info["architecture"],
            "n_params": sum(u.numel for u in units), "units": [[u.name, list(u.shape)] for u in units]}


def register_model(store: Store, root: Path, path: str, name: str | None = None) -> tuple[ModelRow, bool]:
    """Register the model at ``path`` under ``root`` (its folder name unless ``name``); True when new. The
    same name with other weights is a 409."""
    from ..models.loading import check_model_path
    full = resolve_path(root, path)
    check_model_path(full)
    name = name or full.name
    _check_name(name)
    described = _describe(full)
    relative = str(full.relative_to(root.resolve()))
    return _upsert(store, name, relative, described)


def register_embedded(store: Store) -> ModelRow:
    from ..models.loading import default_model_path
    row, _ = _upsert(store, "refllama-s", EMBEDDED, _describe(default_model_path()))
    return row


def _check_name(name: str) -> None:
    import re
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name or ""):
        raise Unprocessable(f"name {name!r}: use letters, digits, '.', '_' or '-' (64 at most)")


def _upsert(store: Store, name: str, path: str, described: dict) -> tuple[ModelRow, bool]:
    from sqlalchemy.exc import IntegrityError
    with store.session() as s:
        row = s.get(ModelRow, name)
        if row is not None:
            if row.hash != described["hash"]:
                raise Conflict(f"model {name!r} is registered with weights {row.hash}; {path} now hashes to "
                               f"{described['hash']}: register it under another name")
            return row, False
        row = ModelRow(id=name, path=path, **described)
        s.add(row)
        try:
            s.commit()
        except IntegrityError:                 # registered by a concurrent request meanwhile
            s.rollback()
            return s.get(ModelRow, name), False
        return row, True


def get_model(store: Store, model_id: str) -> ModelRow:
    return store.fetch(ModelRow, model_id, f"no model {model_id!r}: register it with POST /v1/models (GET /v1/models "
                                           "lists them)")


# -- tables ---------------------------------------------------------------------------------------------
def table_request(model: ModelRow, request: dict) -> dict:
    """The request's table fields with allocate's defaults, plus the model's hash: equal dicts, one table."""
    out = {k: request.get(k) if request.get(k) is not None else v for k, v in TABLE_FIELDS.items()}
    return {"model": model.id, "model_hash": model.hash, **out}


def request_key(treq: dict) -> str:
    return hashlib.blake2b(json.dumps(treq, sort_keys=True).encode(), digest_size=16).hexdigest()


def table_row_from(table, key: str, key_inputs: dict, model: ModelRow, quantizer: str, seconds: float) -> TableRow:
    """A table as a row: the safetensors bytes of its costs and its JSON sidecar (SensitivityTable.save's
    two files)."""
    from safetensors.torch import save
    tensors = {"cost": table.cost.contiguous()}
    if table.row_cost is not None:
        tensors["row_cost"] = table.row_cost.contiguous()
    meta = {k: v for k, v in table.meta.items() if k != "cached"}
    sidecar = json.dumps({"format": "bitalloc.table", "version": 1, "meta": meta,
                          "units": [u.to_json() for u in table.units], "options": [o.to_json() for o in table.options]})
    return TableRow(id=new_id("tbl"), key=key, model_id=model.id, model_hash=model.hash, probe=table.probe,
                    quantizer=quantizer, key_inputs=json.loads(json.dumps(key_inputs, default=str)),
                    sidecar=sidecar, data=save(tensors), seconds=seconds)


def table_from_row(row: TableRow):
    from safetensors.torch import load

    from ..options import QuantSpec
    from ..sensitivity.table import SensitivityTable
    from ..units import Unit
    side = json.loads(row.sidecar)
    tensors = load(bytes(row.data))
    return SensitivityTable([Unit.from_json(u) for u in side["units"]], [QuantSpec(**o) for o in side["options"]],
                            tensors["cost"], side.get("meta", {}), tensors.get("row_cost"))


class Recent:
    """The last ``size`` values made by ``make`` for a key, kept in memory (thread-safe)."""

    def __init__(self, size: int):
        self.size, self._values, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = make()
        with self._lock:
            self._values[key] = value
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return value


class TableCache(Recent):
    """The last few tables read from the store, parsed (a plan request then costs a solve, not a load), and
    the plans solved from them: an identical request is answered with the plan already made."""

    def __init__(self, size: int = 8, plans: int = 4096):
        super().__init__(size)
        self.plans = Recent(plans)
        self.curves = Recent(32)              # Pareto points and charts of a table (routes/models.py)

    def table(self, store: Store, table_id: str):
        return self.get(table_id, lambda: table_from_row(store.fetch(TableRow, table_id, f"no table {table_id!r}")))


def find_table(store: Store, key: str) -> TableRow | None:
    with store.session() as s:
        return s.scalars(select(TableRow).where(TableRow.key == key)).first()


# -- plans ----------------------------------------------------------------------------------------------
def solve_plan(store: Store, tables: TableCache, model: ModelRow, table_id: str, request: dict) -> PlanRow:
    """The plan of the request on the stored table (api.solve, as `bitalloc allocate` does), kept in the store;
    the same request again gets the same plan."""
    key = (table_id, json.dumps(request, sort_keys=True))
    return tables.plans.get(key, lambda: _solve_plan(store, tables, model, table_id, request))


def _solve_plan(store: Store, tables: TableCache, model: ModelRow, table_id: str, request: dict) -> PlanRow:
    from ..api import finish
    table = tables.table(store, table_id)
    plan = plan_from_table(table, model, request)
    if plan.row_bits:
        # the check of a row plan against the layer plan scores both on the model: a job (``"check": true``)
        plan.extra["row_check"] = "not run (served from the stored table; ask with \"check\": true to run it)"
    else:
        plan = finish(None, table, plan, quantizer=table_request(model, request)["quantizer"])
    return save_plan(store, model, table_id, request, plan)


def plan_from_table(table, model: ModelRow, request: dict, settings: dict | None = None):
    """``api.solve`` of the request on ``table`` (the solver and granularity defaults of `bitalloc allocate`);
    ``settings``: the search solvers' (their fitness on the model: a plan job, jobs.py)."""
    from ..api import solve
    if table.meta.get("model", {}).get("hash") != model.hash:
        raise Conflict(f"the table was measured on another model than {model.id!r} (hash "
                       f"{table.meta.get('model', {}).get('hash')} ≠ {model.hash}): measure it again")
    budget, granularity = request["budget_bits"], request.get("granularity") or "layer"
    solver = request.get("solver") or ("closed_form" if granularity == "row" else "ilp")
    floor = float(table.sizes().min(dim=1).values.sum() / table.numels().sum())
    if budget < floor - 1e-9:
        raise Unprocessable(f"budget_bits {budget} is below the cheapest plan of {model.id!r}: the feasible "
                            f"minimum is {math.ceil(floor * 1e4) / 1e4} true bits per weight")
    return solve(table, budget, solver, settings=settings, fuse=bool(request.get("fuse")), granularity=granularity)


def save_plan(store: Store, model: ModelRow, table_id: str, request: dict, plan) -> PlanRow:
    row = PlanRow(id=new_id("plan"), model_id=model.id, table_id=table_id, request=request, plan=plan.dumps(),
                  true_bpw=plan.true_bpw)
    with store.session() as s:
        s.add(row)
        s.commit()
    return row


def get_plan(store: Store, plan_id: str) -> PlanRow:
    return store.fetch(PlanRow, plan_id, f"no plan {plan_id!r} (GET /v1/plans lists them)")
