"""A GGUF file's metadata, read once per process.

The ``gguf`` package's reader builds a numpy view per array element: on Gemma-3's file (a 262k-entry
vocabulary, three arrays of it) one read took 20 s on this project's 2-core machine, and writing or sizing a
GGUF read it three times. This reader walks the key-value section with ``struct`` and numpy (well under a
second there) and keeps the result per file (path, size, modification time).

    metadata(path) -> {key: Value(type, value, sub_type)}

A string is a ``str`` (``bytes`` where it is not UTF-8, so it is written back unchanged); an array is a list.
"""
from __future__ import annotations

import functools
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import BitallocError

# GGUF's value types: code -> (struct format, numpy dtype) for the fixed-size ones
SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
           4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
           10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
STRING, ARRAY = 8, 9


class Value(NamedTuple):
    type: int                  # gguf.GGUFValueType's code
    value: Any
    sub_type: int | None = None      # an array's element type


def metadata(path: str | os.PathLike) -> dict[str, Value]:
    """The key-value metadata of the GGUF file at ``path`` (cached while the file is unchanged)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns)


def value(path: str | os.PathLike, key: str) -> Any:
    """One metadata value of the GGUF file at ``path``."""
    fields = metadata(path)
    if key not in fields:
        raise BitallocError(f"{path} has no {key!r} in its metadata: is it a GGUF file llama.cpp wrote?")
    return fields[key].value


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime: int) -> dict[str, Value]:
    with open(path, "rb") as f:
        data = f.read(min(size, 1 << 20))
        cursor = _Cursor(data, f, path)
        if cursor.take(4) != b"GGUF":
            raise BitallocError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        version, _, n_kv = struct.unpack("<IQQ", cursor.take(20))
        if version < 2:
            raise BitallocError(f"{path} is GGUF version {version}: convert it with a current llama.cpp")
        out = {}
        for _ in range(n_kv):
            key = cursor.string().decode("utf-8")
            vtype = cursor.u32()
            if vtype == ARRAY:
                sub, count = cursor.u32(), cursor.u64()
                out[key] = Value(ARRAY, cursor.array(sub, count), sub)
            else:
                out[key] = Value(vtype, cursor.scalar(vtype))
    return out


class _Cursor:
    """Reads the file's front in order, pulling more bytes from ``f`` when the buffer runs out."""

    def __init__(self, data: bytes, f, path: str):
        self.data, self.pos, self.f, self.path = data, 0, f, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            more = self.f.read(max(n, 1 << 22))
            if self.pos + n > len(self.data) + len(more):
                raise BitallocError(f"{self.path} ends inside its metadata: the file is truncated")
            self.data, self.pos = self.data[self.pos:] + more, 0
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u64())

    def scalar(self, vtype: int):
        if vtype == STRING:
            return _text(self.string())
        if vtype not in SCALARS:
            raise BitallocError(f"{self.path} has a metadata value of unknown type {vtype}")
        fmt, _ = SCALARS[vtype]
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def array(self, sub: int, count: int) -> list:
        if sub == STRING:
            return [_text(self.string()) for _ in range(count)]
        if sub == ARRAY:
            return [self.array(self.u32(), self.u64()) for _ in range(count)]
        if sub not in SCALARS:
            raise BitallocError(f"{self.path} has a metadata array of unknown type {sub}")
        dtype = np.dtype(SCALARS[sub][1]).newbyteorder("<")
        return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()


def _text(raw: bytes):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
