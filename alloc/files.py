"""Atomic file writing: every file bitalloc writes appears whole or not at all."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import BitallocError


def cache_dir() -> Path:
    """Where bitalloc keeps what it can measure again (tables, converted GGUF files): ``$BITALLOC_CACHE``, else
    ``~/.cache/bitalloc``."""
    return Path(os.environ.get("BITALLOC_CACHE", Path.home() / ".cache" / "bitalloc"))


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def is_write_error(e: BaseException) -> bool:
    """An OS error while writing (disk full, read-only, no permission), also as safetensors reports it."""
    if isinstance(e, OSError):
        return True
    return type(e).__name__ == "SafetensorError" and any(
        k in str(e) for k in ("IoError", "No space", "StorageFull", "Permission", "ReadOnly", "Read-only"))


def os_error_line(e: BaseException, path: str | os.PathLike, need_bytes: float | None = None) -> str:
    """One line for an OS error at ``path``: what happened, and for a full disk the space needed and free."""
    import errno
    import shutil
    text = str(e)
    code = getattr(e, "errno", None)
    full = code == errno.ENOSPC or "No space" in text or "StorageFull" in text or "os error 28" in text
    if full:
        where = Path(path)
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            free = f", {_size(shutil.disk_usage(where).free)} free"
        except OSError:
            free = ""
        need = f"needs {_size(need_bytes)}" if need_bytes else "more space needed"
        return f"no space left on the device writing {str(path)!r} ({need}{free}): free space or write elsewhere"
    if code in (errno.EROFS,) or "Read-only" in text or "ReadOnly" in text:
        return f"{str(path)!r} is on a read-only file system: write elsewhere"
    if code in (errno.EACCES, errno.EPERM) or "Permission" in text:
        return f"no permission to write {str(path)!r}: check its folder's permissions or write elsewhere"
    reason = getattr(e, "strerror", None) or (text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__)
    return f"could not write {str(path)!r} ({reason})"


def check_writable(folder: str | os.PathLike, flag: str = "--out", *, try_it: bool = False) -> None:
    """Refuse early (before slow work) to write into a folder we may not write to; ``try_it``: by creating and
    removing a temporary file there (what also catches a read-only mount and root's writes)."""
    folder = Path(folder) if str(folder) else Path(".")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BitallocError(f"cannot write into {str(folder)!r} (read-only or no permission): choose another {flag}")
    if try_it:
        try:
            fd, probe = tempfile.mkstemp(prefix=temp_prefix("write-check"), dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise BitallocError(f"{os_error_line(e, folder)} (choose another {flag})") from None


def check_space(folder: str | os.PathLike, need_bytes: float, flag: str = "--out") -> None:
    """Refuse before slow work when ``folder``'s file system has less free space than ``need_bytes``."""
    import shutil
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise BitallocError(f"{str(folder)!r} has {_size(free)} free, the output needs about {_size(need_bytes)}: "
                            f"free space or choose another {flag}")


def check_parent(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse to write into a directory that does not exist (we never create parents silently)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BitallocError(f"output directory {str(parent)!r} does not exist: create it or choose another {flag}")
    check_writable(parent, flag)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_prefix(name: str) -> str:
    """The name start of a temporary file or folder of ours beside ``name``: it holds our process id, so a
    later run can tell one left by a killed process (clean_stale) from one still being written."""
    return f".{name}.bitalloc-{os.getpid()}-"


_STALE = re.compile(r"^\..+\.bitalloc-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(folder: str | os.PathLike) -> tuple[int, int]:
    """Remove the temporary files and folders of ours in ``folder`` whose process is gone (SIGKILL, power
    loss); say so in one line. Returns (entries removed, bytes freed)."""
    import shutil
    import warnings

    from .errors import BitallocWarning
    removed = freed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0, 0
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
        try:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:
            continue
        removed, freed = removed + 1, freed + size
    if removed:
        warnings.warn(f"removed {removed} unfinished temporary file(s) left in {str(folder)!r} by an interrupted run "
                      f"({_size(freed)} freed)", BitallocWarning, stacklevel=3)
    return removed, freed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = check_parent(path)
    clean_stale(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
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


def check_new_folder(path: str | os.PathLike) -> Path:
    """A checkpoint folder to create: its parent must exist and it must not hold anything yet."""
    out = check_parent(path)
    check_writable(out.parent, try_it=True)
    if out.exists() and not out.is_dir():
        raise BitallocError(f"{str(out)!r} is a file: give a new folder name for the packed checkpoint")
    if out.exists() and any(out.iterdir()):
        raise BitallocError(f"{str(out)!r} exists and is not empty: choose a new folder")
    return out
