"""Requests a browser page on another site could make on a user's behalf are refused before any handler.

    writes (POST, PUT, PATCH)          must carry a JSON body (415 otherwise): a cross-site page can send
                                       text/plain or a form without asking, but not application/json, which
                                       needs a CORS preflight this server never grants
    writes, DELETE too                 with an Origin, it must be this server's own (403 otherwise)
    every request to a server on loopback  must name a loopback host (403 otherwise): a page on a domain that
                                       resolves to 127.0.0.1 (DNS rebinding) would read plans, and write on
                                       --no-auth
"""
from __future__ import annotations

from urllib.parse import urlsplit

WRITES = (b"POST", b"PUT", b"PATCH", b"DELETE")
WITH_BODY = (b"POST", b"PUT", b"PATCH")          # DELETE carries no body (and is never a "simple" request)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def _hostname(host: str) -> str:
    """The name part of a Host header value ("127.0.0.1:8321" -> "127.0.0.1", "[::1]:80" -> "::1")."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refusal(method: str, headers: dict[bytes, bytes], loopback_only: bool) -> tuple[int, str] | None:
    """(status, one-line message) for a request to refuse, else None."""
    host = headers.get(b"host", b"").decode("latin-1").strip().lower()
    if loopback_only and _hostname(host) not in LOOPBACK_NAMES:
        return 403, (f"Host {host or '(none)'!r} is not this server: it listens on loopback, ask it as "
                     "http://127.0.0.1:PORT")
    if method.encode() not in WRITES:
        return None
    kind = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
    if method.encode() in WITH_BODY and kind != "application/json":
        return 415, (f"the request body is {kind or 'untyped'}: send JSON with the header "
                     "Content-Type: application/json")
    origin = headers.get(b"origin")
    if origin is not None:
        netloc = urlsplit(origin.decode("latin-1").strip()).netloc.lower()
        if netloc != host:
            return 403, f"a write from another site ({origin.decode('latin-1')[:80]}) is refused"
    return None
