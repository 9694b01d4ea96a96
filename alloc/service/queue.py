"""The job queue: Huey (an existing task library), on the same database as the store.

    sqlite:///…/store.db   Huey's SqliteHuey in queue.db beside it (processes on one machine share it)
    postgresql://…         Huey's SqlHuey on the same PostgreSQL database (workers on many machines)

Messages are JSON (a Serializer of our own: no pickle anywhere). One task, ``table``: run the table job
(jobs.run). Each worker also reaps: every few seconds it queues again the jobs whose worker stopped beating.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from huey.consumer import Consumer
from huey.registry import Message
from huey.serializer import Serializer

from . import jobs
from .store import Store

TASK_NAME = "bitalloc.table"


class JsonSerializer(Serializer):
    """Huey's messages as JSON: a message is a tuple of plain values (ids, names, numbers)."""

    def _serialize(self, data) -> bytes:
        if isinstance(data, Message):
            data = {"message": list(data)}
        return json.dumps(data, default=str).encode()

    def _deserialize(self, data: bytes):
        value = json.loads(bytes(data).decode())
        if isinstance(value, dict) and "message" in value:
            return Message(*value["message"])
        return value


def make_huey(store: Store, *, immediate: bool = False):
    """Huey on the store's database."""
    from huey import SqliteHuey
    options = dict(name="bitalloc", results=False, serializer=JsonSerializer(), utc=True, immediate=immediate)
    if store.url.startswith("sqlite:///"):
        return SqliteHuey(filename=str(Path(store.url[len("sqlite:///"):]).with_name("queue.db")), **options)
    from huey.contrib.sql_huey import SqlHuey
    return SqlHuey(database="psycopg3://" + store.url.split("://", 1)[1], **options)


class Queue:
    """Huey plus the one task; ``enqueue(job_id)`` is what jobs.submit and jobs.reap call."""

    def __init__(self, store: Store, models_root: Path):
        self.store, self.models_root = store, models_root
        self.huey = make_huey(store)

        @self.huey.task(name=TASK_NAME)
        def table(job_id: str) -> None:
            jobs.run(self.store, job_id, self.models_root)

        self._task = table

    def enqueue(self, job_id: str) -> None:
        self._task(job_id)

    def pending(self) -> int:
        return self.huey.pending_count()


class _QuietConsumer(Consumer):
    """A consumer that leaves signals to its host (uvicorn, or `bitalloc worker`'s own handler)."""

    def _set_signal_handlers(self) -> None:
        pass


class Worker:
    """A Huey consumer (``threads`` worker threads) and a reaper thread; ``start``/``stop``."""

    def __init__(self, queue: Queue, *, threads: int = 1, stale_after: float = 20.0, reap_every: float = 2.0):
        self.queue, self.stale_after, self.reap_every = queue, stale_after, reap_every
        self.consumer = _QuietConsumer(queue.huey, workers=threads, worker_type="thread", initial_delay=0.05,
                                       max_delay=0.5, periodic=False)
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap, daemon=True, name="bitalloc-reaper")

    def start(self) -> None:
        logging.getLogger("huey").setLevel(logging.WARNING)
        self.consumer.start()
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        self.consumer.stop(graceful=False)

    def _reap(self) -> None:
        while not self._stop.wait(self.reap_every):
            try:
                jobs.reap(self.queue.store, self.queue.enqueue, self.stale_after)
            except Exception:        # the store is briefly away: try again at the next round
                pass
