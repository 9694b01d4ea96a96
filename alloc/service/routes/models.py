"""/v1/models: register (POST), list, read, the tables measured on a model, its Pareto curve."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select

from .. import catalog, charts
from ..schemas import ModelIn, ModelOut
from ..store import JobRow, ModelRow, TableRow
from . import service, writer

router = APIRouter(prefix="/v1/models", tags=["models"])


def model_out(row: ModelRow) -> dict:
    return ModelOut(id=row.id, architecture=row.architecture, hash=row.hash, n_params=row.n_params,
                    n_units=len(row.units), path=row.path).model_dump()


@router.get("")
def list_models(request: Request) -> list[ModelOut]:
    with service(request).store.session() as s:
        return [model_out(r) for r in s.scalars(select(ModelRow).order_by(ModelRow.created)).all()]


@router.post("", status_code=201, dependencies=[Depends(writer)])
def register(body: ModelIn, request: Request):
    svc = service(request)
    row, new = catalog.register_model(svc.store, svc.models_root, body.path, body.name)
    return JSONResponse(model_out(row), status_code=201 if new else 200)


@router.get("/{model_id}")
def get_model(model_id: str, request: Request) -> ModelOut:
    return model_out(catalog.get_model(service(request).store, model_id))


@router.get("/{model_id}/tables")
def tables(model_id: str, request: Request) -> list[dict]:
    svc = service(request)
    catalog.get_model(svc.store, model_id)
    with svc.store.session() as s:
        rows = s.execute(select(TableRow.id, TableRow.probe, TableRow.quantizer, TableRow.seconds, TableRow.created,
                                TableRow.key).where(TableRow.model_id == model_id).order_by(TableRow.created)).all()
        requests = {j.table_id: j.request for j in s.scalars(select(JobRow).where(JobRow.model_id == model_id))}
    return [{"id": r.id, "probe": r.probe, "quantizer": r.quantizer, "seconds": round(r.seconds, 1),
             "created": r.created.isoformat(), "key": r.key, "request": requests.get(r.id)} for r in rows]


def latest_table(svc, model_id: str, table_id: str | None) -> str:
    from ..errors import NotFound
    with svc.store.session() as s:
        q = select(TableRow.id).where(TableRow.model_id == model_id)
        if table_id:
            q = q.where(TableRow.id == table_id)
        found = s.scalars(q.order_by(TableRow.created.desc())).first()
    if found is None:
        raise NotFound(f"model {model_id!r} has no stored table{' ' + table_id if table_id else ''}: POST /v1/plans "
                       "measures one")
    return found


@router.get("/{model_id}/pareto", responses={200: {"content": {"image/png": {}}}})
def pareto(model_id: str, request: Request, table: str | None = None,
           format: str = Query("json", pattern="^(json|png)$")):
    """The curve of plans from a stored table (default: the latest), with uniform widths and llama.cpp's mixes."""
    svc = service(request)
    model = catalog.get_model(svc.store, model_id)
    table_id = latest_table(svc, model.id, table)
    points = svc.tables.curves.get(table_id, lambda: charts.pareto_points(svc.tables.table(svc.store, table_id)))
    if format == "png":
        png = svc.tables.curves.get((table_id, "png"), lambda: charts.pareto_png(
            points, f"{model.id}: plans from table {table_id}"))
        return Response(png, media_type="image/png")
    return {"model": model.id, "table": table_id, **points}
