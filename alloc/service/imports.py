"""Import bitalloc's file cache (alloc/table_cache.py: ``tables/PROBE-KEY.safetensors`` + sidecar) into the
store: each table measured on a registered model (same hash) becomes a table row under the same key, so a
worker asked for it finds it instead of measuring again."""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from .catalog import table_row_from
from .jobs import write_table
from .store import ModelRow, Store


def import_cache(store: Store, folder: Path | None = None) -> tuple[int, int]:
    """(tables imported, tables left: unreadable or measured on no registered model)."""
    from ..files import cache_dir
    from ..sensitivity.table import SensitivityTable
    folder = Path(folder or cache_dir() / "tables")
    with store.session() as s:
        models = {m.hash: m for m in s.scalars(select(ModelRow)).all()}
    done = left = 0
    for path in sorted(folder.glob("*.safetensors")):
        key = path.stem.rsplit("-", 1)[-1]
        try:
            table = SensitivityTable.load(path)
        except Exception:
            left += 1
            continue
        model = models.get(table.meta.get("model", {}).get("hash"))
        if model is None:
            left += 1
            continue
        quantizer = (table.meta.get("settings") or {}).get("quantizer", "rtn")
        write_table(store, table_row_from(table, key, {"imported_from": str(path)}, model,
                                          quantizer if isinstance(quantizer, str) else "rtn", 0.0))
        done += 1
    return done, left
