"""Calibration and evaluation text -> fixed windows of token ids.

With no text given, calibration uses the help topics every Python installation ships
(``pydoc_data.topics``), so nothing third-party is bundled and nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .errors import BitallocError


def default_text() -> str:
    """Python's own help topics (~460k characters), present in every CPython installation."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


MAX_BAD_BYTES = 0.01       # share of bytes that may fail to decode as UTF-8 before a file counts as not text


def read_text(path: str | os.PathLike | None, max_bytes: int | None = None) -> str:
    """The text of a UTF-8 file (Python's help topics for None), or of its first ``max_bytes`` (cut at a whole
    character). A file that is not text (NUL bytes, a UTF-16 byte-order mark, or more than 1 % of it
    undecodable, e.g. a PNG or a model file) is refused rather than probed as junk."""
    if path is None:
        return default_text()
    try:
        with open(path, "rb") as f:
            data = f.read() if max_bytes is None else f.read(max_bytes)
    except FileNotFoundError:
        raise BitallocError(f"text file {str(path)!r} does not exist: give a UTF-8 text file") from None
    except IsADirectoryError:
        raise BitallocError(f"{str(path)!r} is a directory: give a UTF-8 text file") from None
    except PermissionError:
        raise BitallocError(f"text file {str(path)!r} is not readable: check its permissions") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise BitallocError(f"{str(path)!r} is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as "
                            "UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    if max_bytes is not None and len(data) == max_bytes:
        data = data[:len(data) - _partial_tail(data)]
    if b"\x00" in data[:1 << 20]:
        raise BitallocError(f"{str(path)!r} is not text (it holds NUL bytes, as binary files do): give a UTF-8 "
                            "text file")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad > MAX_BAD_BYTES * max(len(text), 1):
        raise BitallocError(f"{str(path)!r} is not UTF-8 text ({bad:,} of {len(text):,} characters do not decode): "
                            "give a UTF-8 text file")
    if not text.strip():
        raise BitallocError(f"text file {str(path)!r} is empty: give at least one window of text")
    return text


def _partial_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` are the start of a UTF-8 character cut off by a read limit."""
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 != 0x80:                        # a lead byte (or ASCII): is its character whole?
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4
            return k if need > k else 0
    return 0


def check_text_file(path: str | os.PathLike) -> None:
    """Refuse a calibration file that is not UTF-8 text from its first 64 KiB (before any model loads)."""
    read_text(path, max_bytes=1 << 16)


BYTES_PER_TOKEN = 16       # generous: text runs 3–5 bytes a token; a prefix this long almost always suffices


def calibration_text(source: str | os.PathLike | None, tokens_needed: int, *, is_file: bool) -> tuple[str, bool]:
    """(text, whole): a prefix of the file (or text) long enough for ``tokens_needed`` tokens at
    BYTES_PER_TOKEN, so that 2 × 64 tokens do not read and tokenize a whole corpus; ``whole`` when it is all."""
    limit = max(tokens_needed * BYTES_PER_TOKEN, 1 << 16)
    if is_file:
        size = Path(source).stat().st_size
        return read_text(source, max_bytes=limit if size > limit else None), size <= limit
    text = default_text() if source is None else str(source)
    return (text[:limit], False) if len(text) > limit else (text, True)


MIN_DISTINCT = 50          # distinct tokens natural text shows in any window set (capped at a quarter of the tokens)


def windows(tokenizer, text: str, *, seq_len: int, n_windows: int, source: str = "text",
            strict: bool = False, spare: int = 0) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens: (n, seq_len) int64, and up to
    ``spare`` more where the text has them (held-out windows; no warning when they are missing).

    Fewer tokens than one window is an error; fewer than ``n_windows`` windows is an error when ``strict``
    and otherwise a warning (what there is gets used). Text with very few distinct tokens (a character
    repeated, a tokenizer that maps everything to <unk>) is refused."""
    import warnings

    from .errors import BitallocWarning
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise BitallocError(f"{source} has {ids.numel()} tokens, shorter than one window of {seq_len}: give more "
                            "text or a smaller --seq-len")
    if strict and available < n_windows:
        raise BitallocError(f"{source} gives {available} windows of {seq_len} tokens, fewer than the {n_windows} "
                            "requested: give more text or ask for fewer windows")
    n = min(n_windows, available)
    taken = min(n_windows + spare, available)
    out = ids[: taken * seq_len].view(taken, seq_len).clone()
    distinct, need = int(out.unique().numel()), min(MIN_DISTINCT, out.numel() // 4)
    if distinct < need:
        raise BitallocError(f"{source} has only {distinct} distinct tokens in {out.numel():,}: that is not natural "
                            f"text for this tokenizer; give real text (≥ {need} distinct tokens)")
    if n < n_windows:
        warnings.warn(f"{source} gives {n} windows of {seq_len} tokens, fewer than the {n_windows} asked for: using "
                      f"{n} ({n * seq_len:,} tokens); give more text for the full count", BitallocWarning, stacklevel=2)
    return out


def data_hash(tokens: torch.Tensor) -> str:
    """Hash of the token ids AND the window shape: 2 × 64 and 1 × 128 of the same ids are other calibration."""
    tokens = tokens.detach().cpu().long().contiguous()
    h = hashlib.blake2b(f"{tuple(tokens.shape)}:".encode(), digest_size=12)
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()
