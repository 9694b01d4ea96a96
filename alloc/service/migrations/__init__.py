"""Alembic migrations of the service store (run on every open: ``Store.upgrade``).

A schema change is a new file in versions/ (``down_revision`` = the previous one); never edit a released one.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def config(connection=None):
    from alembic.config import Config
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.set_main_option("version_table", "bitalloc_alembic_version")
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine, revision: str = "head") -> None:
    import logging

    from alembic import command
    logging.getLogger("alembic").setLevel(logging.WARNING)
    with engine.begin() as connection:
        command.upgrade(config(connection), revision)


def current(engine) -> str | None:
    from alembic.migration import MigrationContext
    with engine.connect() as connection:
        return MigrationContext.configure(connection, opts={"version_table": "bitalloc_alembic_version"}).get_current_revision()
