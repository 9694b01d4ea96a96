"""/v1/plans: a plan from the stored table at once (200), or a job that measures the table first (202)."""
from __future__ import annotations

import time
import warnings

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from ... import checks
from ...errors import BitallocWarning, SettingError
from .. import catalog, charts, jobs
from ..errors import NotFound, Unprocessable
from ..schemas import CheckpointIn, PlanIn
from ..store import JobRow, PlanRow
from . import service, writer
from .jobs import job_out

load_plan = catalog.load_plan

router = APIRouter(prefix="/v1/plans", tags=["plans"])


def plan_response(row: PlanRow, status: int = 200) -> Response:
    return Response(row.plan, status_code=status, media_type="application/json",
                    headers={"Location": f"/v1/plans/{row.id}", "X-Bitalloc-Plan-Id": row.id})


def _config(body: PlanIn):
    """The request's AllocateConfig; what can be refused before any table exists is refused here (422)."""
    config = catalog.config_of(body.model_dump())
    try:
        if config.size is None and config.memory is None:     # those are checked on the model once it is loaded
            checks.feasible(config.budget_bits, config.specs(), count_overhead=config.count_overhead)
    except SettingError as e:
        raise Unprocessable(e.worded("budget_bits")) from None
    return config


def _waited(svc, job: JobRow, wait: float) -> JobRow:
    """The job once it ends or ``wait`` seconds have passed (``?wait=SECONDS``), polled from the store."""
    deadline = time.monotonic() + wait
    while job.state in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))
        job = jobs.get_job(svc.store, job.id)
    return job


@router.post("", dependencies=[Depends(writer)], status_code=200,
             responses={202: {"description": "the table is being measured: poll the job"}})
def create_plan(body: PlanIn, request: Request, wait: float = Query(0, ge=0, le=3600)):
    """The plan of `bitalloc allocate` with these settings. 200 with the plan JSON (its id in the
    X-Bitalloc-Plan-Id header) when the table is stored; 202 with the job measuring it otherwise
    (``?wait=SECONDS``: wait that long for the job first)."""
    svc = service(request)
    model = catalog.get_model(svc.store, body.model)
    config = _config(body)
    treq = catalog.table_request(model, config)
    plan_fields = jobs.plan_fields(config) if config.on_model else None     # made on the model, by a worker
    key = catalog.request_key(treq if plan_fields is None else {"table": treq, "plan": plan_fields})
    with svc.store.session() as s:
        job = s.scalars(select(JobRow).where(JobRow.request_key == key)).first()
    if job is None or job.state != "done":
        job = jobs.submit(svc.store, model, treq, svc.queue.enqueue, plan=plan_fields)
        job = _waited(svc, job, wait)
    if job.state == "done" and job.plan_id:
        return plan_response(catalog.get_plan(svc.store, job.plan_id))
    if job.state == "done" and job.table_id and plan_fields is None:
        return plan_response(catalog.solve_plan(svc.store, svc.tables, model, job.table_id, config))
    return JSONResponse(job_out(job), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.post("/{plan_id}/checkpoints", dependencies=[Depends(writer)], status_code=202,
             responses={200: {"description": "the checkpoint is written: its job"}})
def create_checkpoint(plan_id: str, body: CheckpointIn, request: Request, wait: float = Query(0, ge=0, le=3600)):
    """Write the plan as a checkpoint (`bitalloc apply --format`) in a job on a worker: 202 with the job (its
    ``checkpoint`` field: where it is written); 200 with the same once done (``?wait=SECONDS`` waits first).
    The same plan, format and quantizer share one job."""
    svc = service(request)
    row = catalog.get_plan(svc.store, plan_id)
    model = catalog.get_model(svc.store, row.model_id)
    plan = load_plan(row)
    quantizer = body.quantizer or plan.extra.get("quantizer", "rtn")
    if body.format == "gptq" and plan.row_bits:
        raise Unprocessable("field 'format': a GPTQ layer has one width and this is a row plan: ask for format "
                            "bitalloc (compressed-tensors and gguf round its rows up), or for a layer plan")
    job = jobs.submit(svc.store, model, catalog.table_request(model, catalog.config_of(row.request)), svc.queue.enqueue,
                      apply={"plan": row.id, "format": body.format, "quantizer": quantizer})
    job = _waited(svc, job, wait)
    return JSONResponse(job_out(job), status_code=200 if job.state == "done" else 202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("")
def list_plans(request: Request, model: str | None = None, limit: int = 100) -> list[dict]:
    with service(request).store.session() as s:
        q = select(PlanRow.id, PlanRow.model_id, PlanRow.request, PlanRow.true_bpw, PlanRow.created)
        if model:
            q = q.where(PlanRow.model_id == model)
        rows = s.execute(q.order_by(PlanRow.created.desc()).limit(max(1, min(limit, 1000)))).all()
    return [{"id": r.id, "model": r.model_id, "budget_bits": r.request.get("budget_bits"),
             "granularity": r.request.get("granularity", "layer"), "true_bpw": round(r.true_bpw, 6),
             "created": r.created.isoformat()} for r in rows]


@router.get("/{plan_id}")
def read_plan(plan_id: str, request: Request):
    return plan_response(catalog.get_plan(service(request).store, plan_id))


@router.get("/{plan_id}/export/{fmt}", responses={200: {"content": {"text/plain": {}}}})
def export_plan(plan_id: str, fmt: str, request: Request):
    """The plan for another tool: gptqmodel (its `dynamic` config), llama.cpp (a --tensor-type file),
    compressed-tensors (a quantization_config). Row plans are rounded up to one width per layer (the
    X-Bitalloc-Warning header says so)."""
    from ...export import FORMATS, export
    svc = service(request)
    row = catalog.get_plan(svc.store, plan_id)
    if fmt not in FORMATS:
        raise NotFound(f"no export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BitallocWarning)
        text = export(load_plan(row), fmt)
    # a read: nothing is stored (the export is a pure function of the stored plan; an anonymous GET never writes)
    said = [str(w.message) for w in caught if issubclass(w.category, BitallocWarning)]
    media = "text/plain" if fmt == "llama.cpp" else "application/json"
    filename = {"llama.cpp": "tensor-types.txt"}.get(fmt, f"{fmt}.json")
    headers = {"Content-Disposition": f'attachment; filename="{plan_id}-{filename}"'}
    if said:
        headers["X-Bitalloc-Warning"] = said[0].encode("ascii", "replace").decode()[:300]
    return Response(text, media_type=media, headers=headers)


@router.get("/{plan_id}/heatmap.png", responses={200: {"content": {"image/png": {}}}})
def heatmap(plan_id: str, request: Request):
    row = catalog.get_plan(service(request).store, plan_id)
    return Response(charts.heatmap_png(load_plan(row)), media_type="image/png")
