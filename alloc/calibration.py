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


def read_text(path: str | os.PathLike | None) -> str:
    if path is None:
        return default_text()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise BitallocError(f"text file {str(path)!r} does not exist: give a UTF-8 text file") from None
    except IsADirectoryError:
        raise BitallocError(f"{str(path)!r} is a directory: give a UTF-8 text file") from None
    if not text.strip():
        raise BitallocError(f"text file {str(path)!r} is empty: give at least one window of text")
    return text


def windows(tokenizer, text: str, *, seq_len: int, n_windows: int, source: str = "text",
            strict: bool = False) -> torch.Tensor:
    """The first ``n_windows`` non-overlapping windows of ``seq_len`` tokens: (n, seq_len) int64.

    Fewer tokens than one window is an error; fewer than ``n_windows`` windows is an error when ``strict``
    and otherwise uses what there is."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seq_len
    if available == 0:
        raise BitallocError(f"{source} has {ids.numel()} tokens, shorter than one window of {seq_len}: give more "
                            "text or a smaller --seq-len")
    if strict and available < n_windows:
        raise BitallocError(f"{source} gives {available} windows of {seq_len} tokens, fewer than the {n_windows} "
                            "requested: give more text or ask for fewer windows")
    n = min(n_windows, available)
    return ids[: n * seq_len].view(n, seq_len).clone()


def data_hash(tokens: torch.Tensor) -> str:
    return hashlib.blake2b(tokens.numpy().tobytes(), digest_size=12).hexdigest()
