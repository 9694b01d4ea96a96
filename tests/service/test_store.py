"""The store: Alembic schema, tables written once, the file cache imported, progress read from the probe's bar;
the server's own refusals (no auth off loopback, an unreachable store, the password never shown)."""
import pytest


def test_the_schema_is_alembics_head(tmp_path):
    from bitalloc.service.migrations import current
    from bitalloc.service.store import Store
    store = Store(f"sqlite:///{tmp_path}/s.db")
    assert current(store.engine) == "0002"
    Store(store.url)                         # opening again upgrades nothing and fails nothing
    assert current(store.engine) == "0002"


def test_a_store_of_the_first_schema_is_upgraded_with_its_rows(tmp_path):
    """A store made by the first release (schema 0001) opens: Alembic adds plan_id, the jobs stay."""
    from sqlalchemy import text

    from bitalloc.service.migrations import current, upgrade
    from bitalloc.service.store import JobRow, Store
    old = Store(f"sqlite:///{tmp_path}/s.db", upgrade=False)
    upgrade(old.engine, "0001")
    with old.engine.begin() as c:
        c.execute(text("INSERT INTO bitalloc_models VALUES ('m', 'p', 'A', 'h', 1, '[]', '2026-01-01')"))
        c.execute(text("INSERT INTO bitalloc_jobs (id, kind, request_key, request, model_id, state, attempts, "
                       "progress, created) VALUES ('job_1', 'table', 'k', '{}', 'm', 'done', 1, '{}', '2026-01-01')"))
    store = Store(old.url)
    assert current(store.engine) == "0002"
    with store.session() as s:
        job = s.get(JobRow, "job_1")
    assert job.state == "done" and job.plan_id is None


def _measured(store, tmp_path):
    from bitalloc.api import measure, prepare
    from bitalloc.service import catalog
    model = catalog.register_embedded(store)
    table = measure(prepare(None, n_windows=2, seq_len=32), "fisher")
    return model, table


def test_a_table_is_written_once_and_reads_back_equal(tmp_path):
    import torch

    from bitalloc.service import catalog, jobs
    from bitalloc.service.store import Store, TableRow
    store = Store(f"sqlite:///{tmp_path}/s.db")
    model, table = _measured(store, tmp_path)
    first = jobs.write_table(store, catalog.table_row_from(table, "k1", {}, model, "rtn", 1.0))
    second = jobs.write_table(store, catalog.table_row_from(table, "k1", {}, model, "rtn", 2.0))
    assert first == second
    with store.session() as s:
        assert s.query(TableRow).count() == 1
        back = catalog.table_from_row(s.get(TableRow, first))
    assert torch.equal(back.cost, table.cost) and torch.equal(back.row_cost, table.row_cost)
    assert [u.name for u in back.units] == [u.name for u in table.units] and back.options == table.options


def test_the_file_cache_is_imported(tmp_path):
    from bitalloc.service.imports import import_cache
    from bitalloc.service.store import Store, TableRow
    store = Store(f"sqlite:///{tmp_path}/s.db")
    _measured(store, tmp_path)              # measured through the file cache (BITALLOC_CACHE, per test)
    assert import_cache(store) == (1, 0)
    with store.session() as s:
        (row,) = s.query(TableRow).all()
    assert row.probe == "fisher" and row.model_id == "refllama-s"
    assert import_cache(store) == (1, 0)    # again: the same key, still one table
    with store.session() as s:
        assert s.query(TableRow).count() == 1


def test_job_progress_is_the_probes_bar():
    from tqdm.std import tqdm

    from bitalloc.service.jobs import _progress
    with tqdm(total=16, desc="fisher", disable=False) as bar:
        bar.update(6)
        p = _progress()
    assert (p["stage"], p["done"], p["total"]) == ("fisher", 6, 16)


def test_no_auth_only_on_loopback(capsys):
    from bitalloc.cli import main
    assert main(["serve", "--host", "0.0.0.0", "--no-auth"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only with --host 127.0.0.1" in err


def test_an_unreachable_store_is_one_line_without_the_password(capsys):
    from bitalloc.cli import main
    from tests.servers import free_port
    url = f"postgresql://someone:s3cr3t-pw@127.0.0.1:{free_port()}/bitalloc"
    assert main(["serve", "--store", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not answer" in err and "s3cr3t-pw" not in err, err


def test_the_client_says_when_the_server_is_away():
    import bitalloc
    from bitalloc.errors import BitallocError
    from tests.servers import free_port
    with pytest.raises(BitallocError, match="does not answer"):
        bitalloc.Client(f"http://127.0.0.1:{free_port()}").allocate("refllama-s", budget_bits=3.2)
