"""One router per resource: models, plans, jobs; pages for people."""
from __future__ import annotations

from fastapi import Request

from ..errors import Unauthorized
from ..security import authorized


def service(request: Request):
    return request.app.state.service


def writer(request: Request) -> None:
    """Dependency of every write endpoint: the bearer token, else 401."""
    if not authorized(request.headers.get("authorization"), service(request).token):
        raise Unauthorized("this endpoint writes: send `Authorization: Bearer <token>` (the token file is in the "
                           "server's data folder, printed at start)")
