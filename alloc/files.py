"""Atomic file writing: every file bitalloc writes appears whole or not at all."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BitallocError


def cache_dir() -> Path:
    """Where bitalloc keeps what it can measure again (tables, converted GGUF files): ``$BITALLOC_CACHE``, else
    ``~/.cache/bitalloc``."""
    return Path(os.environ.get("BITALLOC_CACHE", Path.home() / ".cache" / "bitalloc"))


def check_parent(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse to write into a directory that does not exist (we never create parents silently)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BitallocError(f"output directory {str(parent)!r} does not exist: create it or choose another {flag}")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = check_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
