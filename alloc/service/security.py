"""Who may write: a bearer token made at first start (file mode 0600 in the data folder), checked in constant
time; ``--no-auth`` only where the server listens on loopback."""
from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from ..errors import BitallocError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def token_path(folder: Path) -> Path:
    return folder / "token"


def load_or_create_token(folder: Path) -> str:
    """The server's token; made (``ba_`` and 32 random bytes, url-safe: never starting with "-", which
    ``--token T`` would read as a flag) and written with mode 0600 the first time."""
    path = token_path(folder)
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token
    folder.mkdir(parents=True, exist_ok=True)
    token = "ba_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def check_no_auth(host: str, no_auth: bool) -> None:
    if no_auth and host not in LOOPBACK:
        raise BitallocError(f"--no-auth lets anyone who reaches {host} write: it is allowed only with --host 127.0.0.1")


def authorized(header: str | None, token: str | None) -> bool:
    """``header`` is ``Authorization: Bearer <token>`` (any case of "Bearer"); no token configured (``--no-auth``) lets everyone in."""
    if token is None:
        return True
    scheme, _, given = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer":                  # the scheme is case-insensitive (RFC 7235)
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
