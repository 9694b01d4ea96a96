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
    """(table id, plan id, an apply job's {"checkpoint": its path on this worker}): prepare → measure exactly
    as `bitalloc allocate` does with these settings; a "plan"
    job then solves and finishes the plan on the model (the row check, --check, --refine: api.finish)."""
    with store.session() as s:
        job = s.get(JobRow, job_id)
        model = s.get(ModelRow, job.model_id)
    treq = job.request["table"] if job.kind in ("plan", "apply") else job.request
    if job.kind == "apply":
        return _apply(store, model, treq, job.request["apply"], models_root)
    prepared, table_id = _measure(store, model, treq, models_root, t0)
    if job.kind != "plan":
        return table_id, None, {}
    from ..api import finish, with_fitness
    from .catalog import plan_from_table, save_plan, table_from_row
    table = table_from_row(store.fetch(TableRow, table_id, f"no table {table_id!r}"))
    request = job.request["plan"]
    settings = with_fitness(prepared, request.get("solver") or "ilp", search_settings(request),
                            quantizer=treq["quantizer"])
    plan = plan_from_table(table, model, request, settings)
    plan = finish(prepared, table, plan, quantizer=treq["quantizer"], refine=request.get("refine"),
                  check=bool(request.get("check")), fitness=settings.get("fitness"))
    return table_id, save_plan(store, model, table_id, request, plan).id, {}


def search_settings(request: dict) -> dict:
    """The search solvers' settings from the request, with `bitalloc allocate`'s defaults (cli/common.py)."""
    solver, seed = request.get("solver"), request.get("seed", 0)
    if solver == "evolutionary":
        return {"generations": request.get("generations", 50), "time_limit": request.get("time_limit"), "seed": seed}
    if solver == "optuna":
        return {"n_trials": request.get("generations", 50), "timeout": request.get("time_limit"), "seed": seed}
    return {}


def _prepare(model: ModelRow, r: dict, models_root):
    """The registered model prepared as table request ``r`` says (options, calibration windows, dtype)."""
    from ..api import prepare
    from ..options import parse_options
    options = parse_options(r["options"], group_size=r["group_size"], symmetric=r["symmetric"])
    path = None if model.path == EMBEDDED else str(model_path(models_root, model))    # None: the embedded one
    prepared = prepare(path, options=options, seq_len=r["seq_len"],
                       n_windows=r["n_windows"], experts=r["experts"], dtype=r["dtype"])
    if prepared.info["hash"] != model.hash:
        from .errors import Conflict
        raise Conflict(f"the files of model {model.id!r} changed since it was registered (hash "
                       f"{prepared.info['hash']} ≠ {model.hash}): register them under another name")
    return prepared


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
    from .routes.plans import load_plan
    plan_row = store.fetch(PlanRow, apply["plan"], f"no plan {apply['plan']!r}")
    out = checkpoint_path(apply)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        prepared = _prepare(model, treq, models_root)
        apply_plan(prepared.model, load_plan(plan_row), format=apply["format"], out=out, quantizer=apply["quantizer"],
                   calibration=prepared.tokens, info=prepared.info, tokenizer=prepared.tokenizer)
    return plan_row.table_id, plan_row.id, {"checkpoint": str(out)}


def _measure(store: Store, model: ModelRow, r: dict, models_root, t0: float):
    """(prepared model, table id): the stored table of request ``r``, measured here if it is not stored yet
    (written once)."""
    from ..api import measure, quantizer_settings
    from ..sensitivity import get_probe
    from ..table_cache import key_inputs, table_key
    prepared = _prepare(model, r, models_root)
    settings = quantizer_settings(r["probe"], r["quantizer"], {"stream": "auto"})
    probe_settings = get_probe(r["probe"], **settings).settings()
    key = table_key(prepared, r["probe"], probe_settings)
    found = store_find(store, key)
    if found:                                  # measured before (another request key, or imported)
        return prepared, found
    table = measure(prepared, r["probe"], settings=settings, cache=False)
    row = table_row_from(table, key, key_inputs(prepared, r["probe"], probe_settings), model, r["quantizer"],
                         time.time() - t0)
    return prepared, write_table(store, row)


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
