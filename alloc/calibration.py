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


def read_text(path: str | os.PathLike | None) -> str:
    """The text of a UTF-8 file (Python's help topics for None). A file that is not text (NUL bytes, or more
    than 1 % of it undecodable, e.g. a PNG or a model file) is refused rather than probed as junk."""
    if path is None:
        return default_text()
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BitallocError(f"text file {str(path)!r} does not exist: give a UTF-8 text file") from None
    except IsADirectoryError:
        raise BitallocError(f"{str(path)!r} is a directory: give a UTF-8 text file") from None
    except PermissionError:
        raise BitallocError(f"text file {str(path)!r} is not readable: check its permissions") from None
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


MIN_DISTINCT = 50          # distinct tokens natural text shows in any window set (capped at a quarter of the tokens)


def windows(tokenizer, text: str, *, seq_len: int, n_windows: int, source: str = "text",
            strict: bool = False) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens: (n, seq_len) int64.

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
    out = ids[: n * seq_len].view(n, seq_len).clone()
    distinct, need = int(out.unique().numel()), min(MIN_DISTINCT, out.numel() // 4)
    if distinct < need:
        raise BitallocError(f"{source} has only {distinct} distinct tokens in {out.numel():,}: that is not natural "
                            f"text for this tokenizer; give real text (≥ {need} distinct tokens)")
    if n < n_windows:
        warnings.warn(f"{source} gives {n} windows of {seq_len} tokens, fewer than the {n_windows} asked for: using "
                      f"{n} ({n * seq_len:,} tokens); give more text for the full count", BitallocWarning, stacklevel=2)
    return out


def data_hash(tokens: torch.Tensor) -> str:
    return hashlib.blake2b(tokens.numpy().tobytes(), digest_size=12).hexdigest()
