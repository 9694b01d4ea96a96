"""The HTTP service: FastAPI on the store. ``create_app(Service(...))``; `bitalloc serve` runs it on uvicorn.

One router per resource (routes/): models, plans, jobs, and the web pages. Every error is JSON
``{"error": "<one line>"}`` with its status (400/401/403/404/409/413/422/503), never a stack trace.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BitallocError
from .catalog import TableCache
from .errors import ServiceError
from .guard import refusal
from .store import Store, StoreUnavailable, unavailable

MAX_BODY = 64 * 1024           # bytes: a plan request is a few hundred

log = logging.getLogger("bitalloc.service")


@dataclass
class Service:
    """What the handlers share: the store, the queue, the models root and the write token."""
    store: Store
    queue: object                              # queue.Queue (enqueue, pending)
    models_root: Path
    token: str | None
    dashboard: str | None = None               # an Optuna dashboard on the same store, linked from the pages
    tables: TableCache = field(default_factory=TableCache)
    max_body: int = MAX_BODY
    loopback_only: bool = False                # listening on loopback: requests must name a loopback host


def error(status: int, message: str):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is a 413 (declared or streamed), and what guard.py refuses
    (cross-site writes, another Host on a loopback server) a 415/403, before any handler."""

    def __init__(self, app, limit: int, loopback_only: bool = False):
        self.app, self.limit, self.loopback_only = app, limit, loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refused = refusal(scope["method"], headers, self.loopback_only)      # cross-site writes, rebinding
        if refused is not None:
            return await error(*refused)(scope, receive, send)
        declared = headers.get(b"content-length")
        too_big = f"the request body is over {self.limit:,} bytes: a plan request is a small JSON object"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error(413, too_big)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooBig()
            return message
        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await error(413, too_big)(scope, receive, send)


class _TooBig(Exception):
    pass


def _field_line(exc) -> str:
    errors = exc.errors()
    if not errors:
        return "the request body is not valid"
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",)) or "body"
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    if e.get("type") == "extra_forbidden":
        msg = "is not a field of this request (see /docs)"
    elif e.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    return f"field {where!r}: {msg}"


def create_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from sqlalchemy.exc import DBAPIError, OperationalError
    from starlette.exceptions import HTTPException

    from .. import __version__
    from .routes import jobs, models, pages, plans

    app = FastAPI(title="bitalloc", version=__version__,
                  description="Mixed-precision bit plans from stored sensitivity tables.")
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError):
        return error(exc.status, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable):
        return error(503, str(exc))

    @app.exception_handler(BitallocError)
    async def _bitalloc(request: Request, exc: BitallocError):
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error(422, _field_line(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        message = {404: f"no such path {request.url.path} (the API is under /v1, see /docs)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error(exc.status_code, message)

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _db(request: Request, exc: Exception):
        return error(503, str(unavailable(service.store, exc)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, first)
        return error(500, f"internal error ({type(exc).__name__}): {first}")

    for router in (models.router, plans.router, jobs.router, pages.router):
        app.include_router(router)
    return BodyLimit(app, service.max_body, loopback_only=service.loopback_only)
