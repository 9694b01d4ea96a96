"""The web page: models, tables, plans and jobs, server-rendered (Jinja2) from the same store as /v1."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from .. import catalog
from ..store import JobRow, ModelRow, PlanRow, TableRow
from . import service
from .jobs import job_out

router = APIRouter(include_in_schema=False)
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    return Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))


def render(name: str, **values) -> HTMLResponse:
    return HTMLResponse(_env().get_template(name).render(**values))


def _jobs(s, model_id: str | None = None) -> list[dict]:
    q = select(JobRow).order_by(JobRow.created.desc()).limit(50)
    if model_id:
        q = q.where(JobRow.model_id == model_id)
    return [job_out(j) for j in s.scalars(q).all()]


@router.get("/", response_class=HTMLResponse)
def index(request: Request):
    svc = service(request)
    with svc.store.session() as s:
        models = s.scalars(select(ModelRow).order_by(ModelRow.created)).all()
        tables = s.execute(select(TableRow.id, TableRow.model_id, TableRow.probe, TableRow.quantizer,
                                  TableRow.seconds, TableRow.created).order_by(TableRow.created.desc())).all()
        plans = s.execute(select(PlanRow.id, PlanRow.model_id, PlanRow.request, PlanRow.true_bpw, PlanRow.created)
                          .order_by(PlanRow.created.desc()).limit(50)).all()
        jobs = _jobs(s)
    return render("index.html", models=models, tables=tables, plans=plans, jobs=jobs, store=svc.store.shown,
                  dashboard=svc.dashboard, running=any(j["state"] in ("queued", "running") for j in jobs))


@router.get("/models/{model_id}", response_class=HTMLResponse)
def model_page(model_id: str, request: Request):
    svc = service(request)
    model = catalog.get_model(svc.store, model_id)
    with svc.store.session() as s:
        tables = s.execute(select(TableRow.id, TableRow.probe, TableRow.quantizer, TableRow.seconds, TableRow.created)
                           .where(TableRow.model_id == model.id).order_by(TableRow.created.desc())).all()
        plans = s.execute(select(PlanRow.id, PlanRow.request, PlanRow.true_bpw, PlanRow.created)
                          .where(PlanRow.model_id == model.id).order_by(PlanRow.created.desc()).limit(100)).all()
        jobs = _jobs(s, model.id)
    return render("model.html", model=model, tables=tables, plans=plans, jobs=jobs, dashboard=svc.dashboard,
                  running=any(j["state"] in ("queued", "running") for j in jobs))


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(plan_id: str, request: Request):
    from ...export import FORMATS
    svc = service(request)
    row = catalog.get_plan(svc.store, plan_id)
    plan = catalog.load_plan(row)
    with svc.store.session() as s:
        jobs = _jobs(s, row.model_id)
    return render("plan.html", row=row, plan=plan, layers=plan.table(), formats=FORMATS, jobs=jobs,
                  histogram=plan.bits_histogram(),
                  dashboard=svc.dashboard, running=any(j["state"] in ("queued", "running") for j in jobs))
