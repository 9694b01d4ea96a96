"""The optimizer as a service (DESIGN.md): a thin layer over the same verbs and data model.

    store.py      SQLAlchemy store (SQLite embedded, PostgreSQL shared), Alembic migrations/
    catalog.py    models, tables, plans over the store; solve from stored tables
    jobs.py       table jobs: submit once, run, heartbeat, reap the dead workers' jobs
    queue.py      Huey on the same database (JSON messages), the worker's consumer
    app.py        FastAPI app; routes/ one router per resource; templates/ the web page
    client.py     bitalloc.Client (urllib)
"""
