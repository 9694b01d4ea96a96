import shutil

import pytest

from tests.servers import Serve

# a small table: 4 windows × 64 tokens of the default calibration text (seconds on refllama-s)
SMALL = {"n_windows": 4, "seq_len": 64}


@pytest.fixture(scope="module")
def models_root(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("models")
    shutil.copytree(tiny_llama_dir, root / "tiny")
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_root):
    """`bitalloc serve` (embedded SQLite store and worker) with refllama-s, models under ``models_root``."""
    tmp = tmp_path_factory.mktemp("serve")
    s = Serve(tmp, models_root=models_root, env={"BITALLOC_CACHE": str(tmp / "cache")})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def small_plan(server):
    """A stored refllama-s table (SMALL) and the first 3.2-bit plan served from it: (status of the first ask,
    job, plan body)."""
    body = {"model": "refllama-s", "budget_bits": 3.2, **SMALL}
    status, job = server.json("POST", "/v1/plans", body)
    again, job2 = server.json("POST", "/v1/plans", body)
    assert status == again == 202 and job["id"] == job2["id"], "an identical request got another job"
    done = server.wait_job(job["id"])
    assert done["state"] == "done", done
    status, headers, plan = server.call("POST", "/v1/plans", body)
    assert status == 200, plan
    return job, done, headers["x-bitalloc-plan-id"], plan
