"""A team's set-up on a real PostgreSQL server: `bitalloc serve --no-worker` and two `bitalloc worker` processes
on the same store. One worker is killed mid-probe: the other takes the job over, and the table equals an
undisturbed run. Then the database goes away: the API answers 503 in one line and keeps running."""
import os
import re
import signal
import time

import pytest

from tests.servers import Postgres, Serve, bitalloc

LONG = {"n_windows": 48, "seq_len": 256, "dtype": "fp32", "probe": "fisher", "quantizer": "rtn",
        "check": False}            # a table job long enough (~15 s here) to be killed in the middle


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    try:
        yield server
    finally:
        server.remove()


def test_a_killed_worker_s_job_finishes_on_the_other(postgres, tmp_path):
    serve = Serve(tmp_path, "--store", postgres.url, "--no-worker", env={"BITALLOC_CACHE": str(tmp_path / "c0")})
    workers = [bitalloc(["worker", "--store", postgres.url, "--stale-after", "4"], tmp_path / f"worker{i}.log",
                        env={"BITALLOC_CACHE": str(tmp_path / f"c{i + 1}")}) for i in range(2)]
    try:
        status, job = serve.json("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, **LONG})
        assert status == 202
        deadline = time.time() + 120
        while time.time() < deadline:                 # running, and some windows measured
            _, job = serve.json("GET", f"/v1/jobs/{job['id']}")
            if job["state"] == "running" and job["progress"].get("done", 0) >= 1:
                break
            time.sleep(0.2)
        assert job["state"] == "running" and job["progress"]["total"] > 0, job
        pid = int(job["worker"].split(":")[1])
        (victim,) = [w for w in workers if w.pid == pid]
        os.kill(pid, signal.SIGKILL)
        victim.wait(10)
        done = serve.wait_job(job["id"], seconds=300)
        assert done["state"] == "done" and done["attempts"] == 2, done
        assert int(done["worker"].split(":")[1]) != pid
        status, plan = serve.json("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": 3.2, **LONG})
        assert status == 200 and re.fullmatch(r"[0-9.]+", str(plan["true_bpw"]))
    finally:
        for w in workers:
            w.kill()
    _the_table_equals_an_undisturbed_run(postgres.url, done["table_id"])
    _an_unreachable_store_is_503_and_the_server_stays(serve, postgres)


def _the_table_equals_an_undisturbed_run(url, table_id):
    import torch

    from bitalloc.api import measure, prepare
    from bitalloc.service.catalog import table_from_row
    from bitalloc.service.store import Store, TableRow
    store = Store(url)
    with store.session() as s:
        assert s.query(TableRow).count() == 1
        stored = table_from_row(s.get(TableRow, table_id))
    local = measure(prepare(None, **{k: LONG[k] for k in ("n_windows", "seq_len", "dtype")}), "fisher",
                    settings={"stream": "auto"}, cache=False)
    assert torch.equal(stored.cost, local.cost) and torch.equal(stored.row_cost, local.row_cost)


def _an_unreachable_store_is_503_and_the_server_stays(serve, postgres):
    try:
        postgres.stop()
        status, body = serve.json("GET", "/v1/models")
        assert status == 503 and "does not answer" in body["error"] and "\n" not in body["error"], body
        assert serve.json("GET", "/nope")[0] == 404                   # still serving
        postgres.start()
        deadline = time.time() + 30
        while serve.json("GET", "/v1/models")[0] != 200 and time.time() < deadline:
            time.sleep(0.5)
        assert serve.json("GET", "/v1/models")[0] == 200
    finally:
        serve.stop()
