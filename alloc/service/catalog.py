"""What the service knows, over the store: registered models, stored tables, solved plans.

Every step calls the verbs of alloc/api.py (``prepare``/``measure`` on workers, ``solve`` here); nothing
here measures or solves by itself.

    register_model(store, root, path)     load once under --models-root: hash, architecture, units
    config_of(request)                    the request's AllocateConfig (alloc/config.py: every default there)
    table_request(model, config)          the settings a table depends on, plus the model; its key
    solve_plan(store, tables, model, table_id, config)   api.plan_for on a stored table, saved as a plan row
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
    from ..models.identity import model_info
    from ..models.loading import load_model
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


# -- requests -------------------------------------------------------------------------------------------
def config_of(request: dict):
    """The AllocateConfig of a plan request's fields (None and ``model`` left out); a bad setting is a 422 that
    names its JSON field."""
    from ..config import AllocateConfig
    from ..errors import BitallocError, SettingError
    try:
        return AllocateConfig.from_fields({k: v for k, v in request.items() if v is not None and k != "model"})
    except SettingError as e:
        raise Unprocessable(e.worded(f"field '{e.field}'") if e.field in FIELD_NAMES else str(e)) from None
    except BitallocError as e:
        raise Unprocessable(str(e)) from None


FIELD_NAMES = ("budget_bits", "size", "format", "memory", "context", "kv_type", "batch", "effort", "probe", "solver", "granularity", "quantizer", "options", "group_size", "symmetric",
               "fuse", "experts", "target", "seq_len", "n_windows", "dtype", "check", "refine", "generations",
               "time_limit", "seed")


# -- tables ---------------------------------------------------------------------------------------------
def table_request(model: ModelRow, config) -> dict:
    """The settings a table depends on (resolved by the config), plus the model's hash: equal dicts, one table."""
    return {"model": model.id, "model_hash": model.hash, **config.table_fields()}


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
def solve_plan(store: Store, tables: TableCache, model: ModelRow, table_id: str, config) -> PlanRow:
    """The plan of ``config`` on the stored table (``api.plan_for``, as `bitalloc allocate` makes it), kept in the
    store; the same request again gets the same plan. Only plans made from the table alone (not
    ``config.on_model``: those are jobs)."""
    key = (table_id, json.dumps(config.to_json(), sort_keys=True))
    return tables.plans.get(key, lambda: _solve_plan(store, tables, model, table_id, config))


def _solve_plan(store: Store, tables: TableCache, model: ModelRow, table_id: str, config) -> PlanRow:
    from ..api import plan_for
    table = tables.table(store, table_id)
    check_table(table, model, config)
    return save_plan(store, model, table_id, config, plan_for(table, config))


def check_table(table, model: ModelRow, config) -> None:
    """The stored table was measured on this model, and the budget is feasible on its units."""
    if table.meta.get("model", {}).get("hash") != model.hash:
        raise Conflict(f"the table was measured on another model than {model.id!r} (hash "
                       f"{table.meta.get('model', {}).get('hash')} ≠ {model.hash}): measure it again")
    floor = float(table.sizes().min(dim=1).values.sum() / table.numels().sum())
    if config.budget_bits < floor - 1e-9:
        raise Unprocessable(f"budget_bits {config.budget_bits} is below the cheapest plan of {model.id!r}: the "
                            f"feasible minimum is {math.ceil(floor * 1e4) / 1e4} true bits per weight")


def save_plan(store: Store, model: ModelRow, table_id: str, config, plan) -> PlanRow:
    row = PlanRow(id=new_id("plan"), model_id=model.id, table_id=table_id, request=config.to_json(), plan=plan.dumps(),
                  true_bpw=plan.true_bpw)
    with store.session() as s:
        s.add(row)
        s.commit()
    return row


def load_plan(row: PlanRow):
    """The BitPlan a plan row stores."""
    from ..plan import BitPlan
    return BitPlan.from_json(json.loads(row.plan), source=f"plan {row.id}")


def get_plan(store: Store, plan_id: str) -> PlanRow:
    return store.fetch(PlanRow, plan_id, f"no plan {plan_id!r} (GET /v1/plans lists them)")
