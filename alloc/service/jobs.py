"""Jobs: a table asked for and not yet stored is measured by a worker, once.

    submit(store, model, treq, enqueue)   the job of this table request: an identical request gets the same
                                          job (the request key is unique); a failed one is queued again
    run(store, job_id, worker)            claim, prepare → measure (api.py), write the table in one
                                          transaction, mark done; progress and heartbeat every second;
                                          an "apply" job writes a stored plan's checkpoint instead
    reap(store, enqueue, stale_after)     jobs whose worker stopped beating (killed, machine gone) are queued
                                          again (3 attempts), for any worker to take

The queue itself is Huey's (queue.py); the job rows here are what users see and what makes a retry safe:
a worker only runs a job it moved from queued to running, and a table key is unique, so a table is
written once even if two workers ever finish the same job.
"""
from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from .catalog import EMBEDDED, model_path, request_key, table_row_from
from .store import JobRow, ModelRow, PlanRow, Store, TableRow, data_dir, new_id, now

MAX_ATTEMPTS = 3
BEAT_SECONDS = 1.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"


def submit(store: Store, model: ModelRow, treq: dict, enqueue, plan: dict | None = None,
           apply: dict | None = None) -> JobRow:
    """The job that measures ``treq``'s table (with ``plan``: and then makes that plan on the model, a "plan"
    job; with ``apply`` {plan, format, quantizer}: writes a stored plan's checkpoint, an "apply" job); enqueued
    when it is new or had failed."""
    if apply is not None:
        request, kind = {"table": treq, "apply": apply}, "apply"
    else:
        request, kind = (treq, "table") if plan is None else ({"table": treq, "plan": plan}, "plan")
    key = request_key(request)
    with store.session() as s:
        job = s.scalars(select(JobRow).where(JobRow.request_key == key)).first()
        if job is None:
            job = JobRow(id=new_id("job"), kind=kind, request_key=key,
                         request=request, model_id=model.id, state="queued", attempts=0, progress={})
            s.add(job)
            try:
                s.commit()
            except IntegrityError:                 # the same request, at the same moment: share its job
                s.rollback()
                return s.scalars(select(JobRow).where(JobRow.request_key == key)).one()
            enqueue(job.id)
            return job
        if job.state == "failed":
            moved = s.execute(update(JobRow).where(JobRow.id == job.id, JobRow.state == "failed").values(
                state="queued", attempts=0, error=None, worker=None, progress={})).rowcount
            s.commit()
            if moved:
                enqueue(job.id)
            s.refresh(job)
        return job


def get_job(store: Store, job_id: str) -> JobRow:
    return store.fetch(JobRow, job_id, f"no job {job_id!r}")


def _claim(store: Store, job_id: str, worker: str) -> bool:
    with store.session() as s:
        moved = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == "queued").values(
            state="running", worker=worker, started=now(), heartbeat=now(),
            attempts=JobRow.attempts + 1)).rowcount
        s.commit()
    return moved == 1


def _progress() -> dict:
    """The job's progress, read from the probe's own tqdm bar (the one with a total, most recently made)."""
    from tqdm.std import tqdm
    bars = [b for b in list(tqdm._instances) if getattr(b, "total", None)]
    if not bars:
        return {}
    bar = bars[-1]
    done, total = int(bar.n), int(bar.total)
    rate = bar.format_dict.get("rate") or (done / max(bar.format_dict.get("elapsed") or 1e-9, 1e-9) if done else None)
    eta = (total - done) / rate if rate else None
    return {"stage": str(bar.desc or "measuring").strip(": "), "done": done, "total": total,
            "eta_s": round(eta, 1) if eta is not None else None}


class _Beat(threading.Thread):
    """Writes the job's heartbeat and progress every second until stopped."""

    def __init__(self, store: Store, job_id: str, worker: str):
        super().__init__(daemon=True, name=f"beat-{job_id}")
        self.store, self.job_id, self.worker, self.stop = store, job_id, worker, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(BEAT_SECONDS):
            try:
                with self.store.session() as s:
                    s.execute(update(JobRow).where(JobRow.id == self.job_id, JobRow.worker == self.worker).values(
                        heartbeat=now(), progress=_progress()))
                    s.commit()
            except Exception:            # the store is briefly away: the next beat tries again
                pass


def run(store: Store, job_id: str, models_root, worker: str | None = None) -> str:
    """Run the job if this worker can claim it; its final state ("done", "failed", or "skipped")."""
    worker = worker or worker_name()
    if not _claim(store, job_id, worker):
        return "skipped"
    beat = _Beat(store, job_id, worker)
    beat.start()
    t0 = time.time()
    try:
        table_id, plan_id, written = _work(store, job_id, models_root, t0)
        state, error = "done", None
    except Exception as e:                    # recorded on the job, one line; the worker goes on
        state, error, table_id, plan_id, written = "failed", _one_line(e), None, None, {}
    finally:
        beat.stop.set()
        beat.join()
    with store.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker).values(
            state=state, error=error, table_id=table_id, plan_id=plan_id, finished=now(), heartbeat=now(),
            progress={"stage": state, "seconds": round(time.time() - t0, 1), **written}))
        s.commit()
    return state


def _one_line(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]


def _work(store: Store, job_id: str, models_root, t0: float) -> tuple[str, str | None, dict]:
    """(table id, plan id, an apply job's {"checkpoint": its path on this worker}). A table job measures the table
    as `bitalloc allocate` does (api.prepare_for → api.measure_for, kept in the store); a "plan" job runs
    api.run_allocate with the request's config and the store as its table cache."""
    from ..api import measure_for, prepare_for, run_allocate
    from .catalog import config_of, save_plan
    with store.session() as s:
        job = s.get(JobRow, job_id)
        model = s.get(ModelRow, job.model_id)
    treq = job.request["table"] if job.kind in ("plan", "apply") else job.request
    if job.kind == "apply":
        return _apply(store, model, treq, job.request["apply"], models_root)
    tables = StoreTables(store, model, t0)
    if job.kind != "plan":
        config = config_of({"budget_bits": 16, **_table_fields(treq)})     # a table request has no budget
        measure_for(_checked(prepare_for(config, _path(model, models_root)), model), config, tables)
        return tables.table_id, None, {}
    config = config_of({**_table_fields(treq), **job.request["plan"]})
    done = run_allocate(config, _path(model, models_root), tables=tables,
                        on_prepared=lambda prepared: _checked(prepared, model))
    return tables.table_id, save_plan(store, model, tables.table_id, config, done.plan).id, {}


def plan_fields(config) -> dict:
    """The part of a plan request (its resolved config) that is not the table's: a plan job's request."""
    from ..config import TABLE_FIELDS
    fields = {k: v for k, v in config.to_json().items() if k not in TABLE_FIELDS}
    return {**fields, "by_effort": list(config.by_effort)} if config.by_effort else fields


def _table_fields(treq: dict) -> dict:
    return {k: v for k, v in treq.items() if k not in ("model", "model_hash")}


def _path(model: ModelRow, models_root) -> str | None:
    return None if model.path == EMBEDDED else str(model_path(models_root, model))    # None: the embedded one


def _checked(prepared, model: ModelRow):
    if prepared.info["hash"] != model.hash:
        from .errors import Conflict
        raise Conflict(f"the files of model {model.id!r} changed since it was registered (hash "
                       f"{prepared.info['hash']} ≠ {model.hash}): register them under another name")
    return prepared


def _prepare(model: ModelRow, r: dict, models_root):
    """The registered model prepared as table request ``r`` says (options, calibration windows, dtype)."""
    from ..api import prepare
    from ..options import parse_options
    options = parse_options(r["options"], group_size=r["group_size"], symmetric=r["symmetric"])
    prepared = prepare(_path(model, models_root), options=options, seq_len=r["seq_len"],
                       n_windows=r["n_windows"], experts=r["experts"], dtype=r["dtype"])
    return _checked(prepared, model)


def checkpoint_path(apply: dict) -> Path:
    """Where an apply job writes: ``<data folder>/checkpoints/<plan>-<format>-<quantizer>`` (``.gguf`` for gguf),
    on the worker's machine (a shared folder when workers are many: $BITALLOC_HOME)."""
    name = f"{apply['plan']}-{apply['format']}-{apply['quantizer']}"
    return data_dir() / "checkpoints" / (name + ".gguf" if apply["format"] == "gguf" else name)


def _apply(store: Store, model: ModelRow, treq: dict, apply: dict, models_root) -> tuple[str | None, str, dict]:
    """Write a stored plan as a checkpoint, as `bitalloc apply --format` does (the model prepared with the plan's
    calibration settings: GPTQ calibrates on them). A checkpoint already there (a retried job whose worker died
    after writing it) is kept: the writers make it appear whole or not at all."""
    from ..packed import apply as apply_plan
    from .catalog import load_plan
    plan_row = store.fetch(PlanRow, apply["plan"], f"no plan {apply['plan']!r}")
    out = checkpoint_path(apply)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        prepared = _prepare(model, treq, models_root)
        apply_plan(prepared.model, load_plan(plan_row), format=apply["format"], out=out, quantizer=apply["quantizer"],
                   calibration=prepared.tokens, info=prepared.info, tokenizer=prepared.tokenizer)
    return plan_row.table_id, plan_row.id, {"checkpoint": str(out)}


class StoreTables:
    """The store as ``api.measure_for``'s table cache: a table already stored under the measurement's key is
    read from it, otherwise measured here and written once (``table_id`` then names it)."""

    def __init__(self, store: Store, model: ModelRow, t0: float):
        self.store, self.model, self.t0, self.table_id = store, model, t0, None

    def table(self, prepared, probe: str, settings: dict, measure):
        from ..sensitivity import get_probe
        from ..table_cache import key_inputs, table_key
        from .catalog import table_from_row
        probe_settings = get_probe(probe, **settings).settings()
        key = table_key(prepared, probe, probe_settings)
        self.table_id = store_find(self.store, key)
        if self.table_id is None:
            table = measure()
            row = table_row_from(table, key, key_inputs(prepared, probe, probe_settings), self.model,
                                 settings.get("quantizer", "rtn"), time.time() - self.t0)
            self.table_id = write_table(self.store, row)
            if self.table_id == row.id:
                return table
        return table_from_row(self.store.fetch(TableRow, self.table_id, f"no table {self.table_id!r}"))


def store_find(store: Store, key: str) -> str | None:
    with store.session() as s:
        return s.scalars(select(TableRow.id).where(TableRow.key == key)).first()


def write_table(store: Store, row: TableRow) -> str:
    """Insert the table in one transaction; if its key is already stored, keep that one (written once)."""
    with store.session() as s:
        s.add(row)
        try:
            s.commit()
            return row.id
        except IntegrityError:
            s.rollback()
    return store_find(store, row.key)


def reap(store: Store, enqueue, stale_after: float) -> list[str]:
    """Queue again the running jobs whose heartbeat is older than ``stale_after`` seconds (their worker died);
    a job past MAX_ATTEMPTS fails with a line saying so. The ids queued again."""
    cutoff = now() - dt.timedelta(seconds=stale_after)
    with store.session() as s:
        stale = s.scalars(select(JobRow).where(JobRow.state == "running", JobRow.heartbeat < cutoff)).all()
    again = []
    for job in stale:
        last = job.attempts >= MAX_ATTEMPTS
        with store.session() as s:
            moved = s.execute(update(JobRow).where(JobRow.id == job.id, JobRow.state == "running",
                                                   JobRow.heartbeat < cutoff).values(
                state="failed" if last else "queued", worker=None,
                error=f"its worker {job.worker} stopped after {job.attempts} attempts" if last else None,
                progress={"stage": "failed" if last else f"queued again: worker {job.worker} stopped"})).rowcount
            s.commit()
        if moved and not last:
            enqueue(job.id)
            again.append(job.id)
    return again
