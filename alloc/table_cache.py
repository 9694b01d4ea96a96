"""The table cache: a measured SensitivityTable kept on disk under a key made of every input of the measurement.

    key_inputs(prepared, probe)   what the numbers depend on (model and its dtype, windows × length and ids,
                                  batch size, probe settings with ``stream`` resolved where it changes the
                                  estimator, options, units, the numerics version)
    lookup(prepared, probe)       the cached table, checked against the request, or None
    store(table, path)            written atomically; a full or read-only cache warns and the run goes on

``measure`` (api.py) and the torchrun path (models/distributed.py) both go through here, so both validate hits.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict
from pathlib import Path

from .calibration import data_hash
from .errors import BitallocWarning
from .files import cache_dir, os_error_line

# Bumped whenever the numbers a probe measures change for the same inputs (2: RTN and GPTQ clip by default,
# GPTQ sweeps in act-order; 3: the key holds the window shape, dtype and batch size: older entries are unkeyed;
# 4: GPTQ rounds ggml-type options by GPTQ on their grid, not by their importance-weighted search alone).
TABLE_NUMERICS = 4


def key_inputs(prepared, probe_name: str, settings: dict) -> dict:
    """Every input of a measurement, as JSON-able values (the property test varies each one)."""
    from .quantize import as_quantizer
    settings = dict(settings)
    if "quantizer" in settings:
        settings["quantizer"] = asdict(as_quantizer(settings["quantizer"]))
    if settings.get("stream") == "auto":          # the estimator that will run, not the literal "auto"
        from .sensitivity.base import streams
        settings["stream"] = "on" if streams(prepared.workload, prepared.units, "auto") else "off"
    dtypes = sorted({str(p.dtype) for p in prepared.model.parameters()}) if prepared.model is not None else []
    return {"model": prepared.info.get("hash"), "dtype": dtypes, "data": data_hash(prepared.tokens),
            "windows": list(prepared.tokens.shape), "batch_size": prepared.batch_size, "probe": probe_name,
            "numerics": TABLE_NUMERICS, "settings": settings, "options": [o.to_json() for o in prepared.options],
            "units": [[u.name, list(u.shape), u.kind, u.fused_group] for u in prepared.units]}


def table_key(prepared, probe_name: str, settings: dict) -> str:
    blob = json.dumps(key_inputs(prepared, probe_name, settings), sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


def table_path(prepared, probe_name: str, settings: dict) -> Path:
    return cache_dir() / "tables" / f"{probe_name}-{table_key(prepared, probe_name, settings)}.safetensors"


def lookup(path: Path, prepared, gives_rows: bool):
    """The table cached at ``path`` if it is whole and matches the request; None (after one warning line for
    an unreadable entry) otherwise."""
    from .sensitivity.table import SensitivityTable
    if not (path.is_file() and Path(str(path) + ".json").is_file()):
        return None
    try:
        table = SensitivityTable.load(path)
        if [u.name for u in table.units] != [u.name for u in prepared.units] or \
                list(table.options) != list(prepared.options):
            raise ValueError("units or options differ from the request")
        if table.meta.get("model", {}).get("hash") != prepared.info.get("hash"):
            raise ValueError("it was measured on another model")
        if table.row_cost is None and gives_rows:      # cached before row costs
            return None
    except Exception as e:        # truncated/garbled cache entry: say so once, then measure again
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        warnings.warn(f"cached table {path} is unreadable ({first}): measuring it again", BitallocWarning,
                      stacklevel=3)
        return None
    table.meta["cached"] = str(path)
    return table


def store(table, path: Path) -> bool:
    """Write ``table`` to the cache; an OS error (disk full, read-only, no permission) keeps the measurement
    and warns in one line. True when written."""
    from .errors import BitallocError
    from .files import is_write_error
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
        return True
    except Exception as e:
        if not (is_write_error(e) or isinstance(e, BitallocError)):
            raise
        for leftover in (path, Path(str(path) + ".json")):     # never half an entry
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
        warnings.warn(f"could not cache the table ({os_error_line(e, path) if is_write_error(e) else e}); the result is kept, the next run "
                      "measures it again (set BITALLOC_CACHE to a writable folder, or --no-cache)",
                      BitallocWarning, stacklevel=3)
        return False
