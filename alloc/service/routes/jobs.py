"""/v1/jobs: what a worker is measuring, how far it is."""
from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from ..jobs import get_job
from ..schemas import JobOut
from ..store import JobRow
from . import service

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(job: JobRow) -> dict:
    return JobOut(id=job.id, state=job.state, progress=job.progress or {}, attempts=job.attempts, worker=job.worker,
                  error=job.error, table_id=job.table_id, plan_id=job.plan_id, kind=job.kind, model=job.model_id,
                  poll=f"/v1/jobs/{job.id}", checkpoint=_checkpoint(job)).model_dump()


def _checkpoint(job: JobRow) -> str | None:
    """Where an apply job writes: the path its worker reported once done, else where this machine would write."""
    if job.kind != "apply":
        return None
    if (job.progress or {}).get("checkpoint"):
        return job.progress["checkpoint"]
    from ..jobs import checkpoint_path
    return str(checkpoint_path(job.request["apply"]))


@router.get("")
def list_jobs(request: Request, limit: int = 100) -> list[JobOut]:
    with service(request).store.session() as s:
        rows = s.scalars(select(JobRow).order_by(JobRow.created.desc()).limit(max(1, min(limit, 1000)))).all()
    return [job_out(j) for j in rows]


@router.get("/{job_id}")
def read_job(job_id: str, request: Request) -> JobOut:
    return job_out(get_job(service(request).store, job_id))
