"""The service's store: models, tables, plans, exports and jobs in one database, through SQLAlchemy.

    sqlite:///PATH                   embedded (the default: ``store.db`` in the data folder), zero set-up
    postgresql://user@host/db        a team's server (the one that holds the Optuna studies)

The schema is created and upgraded by Alembic (alloc/service/migrations). Tables are stored whole, as the
bytes of their safetensors file plus the JSON sidecar (never pickle), under their full cache key
(alloc/table_cache.py), and written once: a second worker finishing the same table keeps the first.
"""
from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, Text, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ..errors import BitallocError


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "bitalloc_models"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)          # the name users give (folder name)
    path: Mapped[str] = mapped_column(Text)                                # relative to --models-root, or "@embedded"
    architecture: Mapped[str] = mapped_column(String(128))
    hash: Mapped[str] = mapped_column(String(64))
    n_params: Mapped[int] = mapped_column(Integer)
    units: Mapped[list] = mapped_column(JSON)                              # [[name, [out, in]], …]
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class TableRow(Base):
    __tablename__ = "bitalloc_tables"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)              # table_cache.table_key: every input
    model_id: Mapped[str] = mapped_column(ForeignKey("bitalloc_models.id"))
    model_hash: Mapped[str] = mapped_column(String(64))
    probe: Mapped[str] = mapped_column(String(64))
    quantizer: Mapped[str] = mapped_column(String(32))
    key_inputs: Mapped[dict] = mapped_column(JSON)
    sidecar: Mapped[str] = mapped_column(Text)                             # the table's JSON sidecar
    data: Mapped[bytes] = mapped_column(LargeBinary)                       # the table's safetensors bytes
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class PlanRow(Base):
    __tablename__ = "bitalloc_plans"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("bitalloc_models.id"))
    table_id: Mapped[str | None] = mapped_column(ForeignKey("bitalloc_tables.id"), nullable=True)
    request: Mapped[dict] = mapped_column(JSON)
    plan: Mapped[str] = mapped_column(Text)                                # the plan JSON, as BitPlan.save writes it
    true_bpw: Mapped[float] = mapped_column(Float)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class ExportRow(Base):
    __tablename__ = "bitalloc_exports"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    plan_id: Mapped[str] = mapped_column(ForeignKey("bitalloc_plans.id"))
    format: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=now)


class JobRow(Base):
    """One measurement asked for (a table; or a plan scored on the model). ``request_key`` is unique: identical
    requests share one job."""
    __tablename__ = "bitalloc_jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))                          # "table", or "plan" (check, refine)
    request_key: Mapped[str] = mapped_column(String(64), unique=True)
    request: Mapped[dict] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(ForeignKey("bitalloc_models.id"))
    state: Mapped[str] = mapped_column(String(16), default="queued")       # queued, running, done, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)             # {stage, done, total, eta_s}
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    table_id: Mapped[str | None] = mapped_column(ForeignKey("bitalloc_tables.id"), nullable=True)
    plan_id: Mapped[str | None] = mapped_column(String(32), nullable=True)   # a "plan" job's plan (migration 0002)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=now)
    started: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class StoreUnavailable(BitallocError):
    """The database does not answer (HTTP 503)."""


def data_dir() -> Path:
    """The user data folder: ``$BITALLOC_HOME``, else ``$XDG_DATA_HOME/bitalloc`` (``~/.local/share/bitalloc``)."""
    if os.environ.get("BITALLOC_HOME"):
        return Path(os.environ["BITALLOC_HOME"])
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "bitalloc"


def default_url() -> str:
    return f"sqlite:///{data_dir() / 'store.db'}"


def redact(url: str) -> str:
    """The URL without its password (what may be printed or returned)."""
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable store URL>"


def sqlalchemy_url(url: str) -> str:
    """postgresql:// through psycopg 3 (installed with the search extra), sqlite:// as given."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite://", "postgresql+psycopg://")):
        return url
    raise BitallocError(f"store URL {redact(url)!r} is not understood: use sqlite:///PATH or postgresql://USER@HOST/DB")


class Store:
    """The database behind the service: one engine, short sessions, upgraded to the newest schema on open."""

    def __init__(self, url: str | None = None, *, upgrade: bool = True):
        self.url = url or default_url()
        if self.url.startswith("sqlite:///"):
            Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        args = {"timeout": 30, "check_same_thread": False} if self.url.startswith("sqlite") else {"connect_timeout": 5}
        self.engine = create_engine(sqlalchemy_url(self.url), connect_args=args, pool_pre_ping=True)
        if self.url.startswith("sqlite"):
            from sqlalchemy import event

            @event.listens_for(self.engine, "connect")
            def _wal(conn, _record):             # readers never wait for the one writer
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA busy_timeout=30000")
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        if upgrade:
            self.upgrade()

    @property
    def shown(self) -> str:
        return redact(self.url)

    def upgrade(self) -> None:
        from .migrations import upgrade
        try:
            upgrade(self.engine)
        except Exception as e:
            raise unavailable(self, e) from None

    def fetch(self, row_class, key: str, missing: str):
        """The row of ``row_class`` with primary key ``key``; a 404 saying ``missing`` when there is none."""
        from .errors import NotFound
        with self.session() as s:
            row = s.get(row_class, key)
        if row is None:
            raise NotFound(missing)
        return row

    def ping(self) -> None:
        from sqlalchemy import text
        try:
            with self.engine.connect() as c:
                c.execute(text("select 1"))
        except Exception as e:
            raise unavailable(self, e) from None


def unavailable(store: Store, e: BaseException) -> StoreUnavailable:
    first = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    first = first.replace(store.url, store.shown)
    from sqlalchemy.engine import make_url
    try:
        password = make_url(store.url).password
    except Exception:
        password = None
    if password:
        first = first.replace(str(password), "***")
    return StoreUnavailable(f"the store {store.shown} does not answer ({first[:200]})")
