"""A real PostgreSQL server on loopback, two `bitalloc search` workers on one study, one killed mid-trial.

Also: `bitalloc dashboard` answers HTTP. PostgreSQL comes from Debian's `postgresql` package (.ci/run installs
it); as root, the server runs as the `postgres` user."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.servers import Postgres, free_port as _free_port

optuna = pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def postgres_url():
    server = Postgres()
    try:
        yield server.url
    finally:
        server.remove()


def _worker(args, log: Path):
    cmd = [sys.executable, "-c", "import sys; from bitalloc.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "CI": "1"})


def _trials(url):
    return optuna.load_study(study_name="dist", storage=url).get_trials(deepcopy=False)


def test_two_workers_one_killed_mid_trial(postgres_url, tiny_llama_dir, calib_file, tmp_path):
    n_trials = 12
    args = ["search", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--seq-len", "32",
            "--n-windows", "4", "--windows", "2", "--study", "dist", "--storage", postgres_url,
            "--n-trials", str(n_trials), "--budget", "4.0", "--heartbeat", "1", "--grace", "3",
            "--trial-delay", "0.7", "--sampler", "random"]
    a = _worker(args, tmp_path / "a.log")
    b = _worker(args, tmp_path / "b.log")
    C = optuna.trial.TrialState
    try:
        deadline = time.time() + 120
        while True:            # wait until worker a is inside a trial, with some trials already complete
            assert time.time() < deadline, (tmp_path / "a.log").read_text()[-2000:]
            assert a.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
            try:
                trials = _trials(postgres_url)
            except KeyError:                # the study does not exist yet
                trials = []
            if sum(t.state == C.COMPLETE for t in trials) >= 2 and sum(t.state == C.RUNNING for t in trials) >= 2:
                break
            time.sleep(0.1)
        a.send_signal(signal.SIGKILL)
        a.wait()
        before = {t.number: t.value for t in _trials(postgres_url) if t.state == C.COMPLETE}
        c = _worker(args, tmp_path / "c.log")                       # resume with a fresh worker
        for p, log in ((b, "b.log"), (c, "c.log")):
            assert p.wait(timeout=180) == 0, (tmp_path / log).read_text()[-2000:]
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
    trials = _trials(postgres_url)
    after = {t.number: t.value for t in trials if t.state == C.COMPLETE}
    assert all(after.get(n) == v for n, v in before.items()), "a completed trial was lost or changed"
    assert len(after) >= n_trials
    failed = [t.number for t in trials if t.state == C.FAIL]
    assert failed, "the killed worker's trial was not failed by the heartbeat check"
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    assert set(failed) <= retried, "the killed worker's trial was not retried"
    assert not [t for t in trials if t.state == C.RUNNING]


def test_unreachable_postgres_is_one_line(tiny_llama_dir, calib_file, capsys):
    from bitalloc.cli import main
    port = _free_port()
    assert main(["dashboard", "--storage", f"postgresql://u@127.0.0.1:{port}/db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bitalloc: error: cannot open the study storage") and "\n" not in err


def test_dashboard_answers_http(tmp_path):
    pytest.importorskip("optuna_dashboard")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.create_study(study_name="x", storage=url).optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from bitalloc.cli import main; sys.exit(main())",
                             "dashboard", "--storage", url, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    assert r.status == 200
                    body = r.read().decode()
            except OSError:
                time.sleep(0.3)
        assert body is not None and '"x"' in body
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)          # SIGTERM stops it (a loaded CI machine may take a while)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_the_storage_password_is_never_printed(postgres_url, tiny_llama_dir, calib_file, capsys):
    """Item 10: `search --storage postgresql://user:PASSWORD@…` printed the password in clear."""
    from bitalloc.cli import main
    url = postgres_url.replace("postgres@", "postgres:s3cr3t-pw@")          # the server trusts loopback: any password
    assert main(["search", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--seq-len", "32",
                 "--n-windows", "2", "--windows", "1", "--study", "pw", "--storage", url, "--n-trials", "2",
                 "--budget", "4.0"]) == 0
    bad = f"postgresql://postgres:s3cr3t-pw@127.0.0.1:{_free_port()}/bitalloc"
    assert main(["search", "--model", str(tiny_llama_dir), "--study", "pw", "--storage", bad, "--budget", "4"]) == 2
    out = capsys.readouterr()
    assert "s3cr3t-pw" not in out.out + out.err and "study 'pw'" in out.out
