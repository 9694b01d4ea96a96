"""The service's errors: each is a one-line BitallocError with the HTTP status it answers with."""
from __future__ import annotations

from ..errors import BitallocError


class ServiceError(BitallocError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Forbidden(ServiceError):
    status = 403


class Unauthorized(ServiceError):
    status = 401


class Conflict(ServiceError):
    status = 409


class TooLarge(ServiceError):
    status = 413


class Unprocessable(ServiceError):
    status = 422
