"""Real servers for the tests, on loopback: PostgreSQL (Debian's package; as root it runs as the `postgres`
user), `bitalloc serve` and `bitalloc worker` as subprocesses."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


class Postgres:
    """A throw-away PostgreSQL cluster with a database ``bitalloc``; ``stop()``/``start()`` to take it away."""

    def __init__(self):
        import pytest
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            if os.environ.get("CI"):
                pytest.fail("PostgreSQL is not installed: .ci/run must install Debian's postgresql package")
            pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
        self.as_user: list[str] = []
        self.data = Path(tempfile.mkdtemp(prefix="bitalloc-pg-"))
        if os.geteuid() == 0:               # initdb refuses root: run the server as the postgres user
            shutil.chown(self.data, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port, self.env = free_port(), {**os.environ, "LC_ALL": "C"}
        subprocess.run(self.as_user + [self.initdb, "-D", str(self.data / "db"), "-U", "postgres", "--auth=trust",
                                       "-E", "UTF8"], check=True, capture_output=True, env=self.env)
        self.start()
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE bitalloc")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/bitalloc"

    def start(self) -> None:
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data / "db"), "-l", str(self.data / "log"), "-w",
                                       "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, env=self.env)

    def stop(self) -> None:
        subprocess.run(self.as_user + [self.pg_ctl, "-D", str(self.data / "db"), "-m", "immediate", "stop"],
                       capture_output=True)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)


def bitalloc(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`bitalloc ARGS` as a subprocess, its output in ``log``."""
    cmd = [sys.executable, "-c", "import sys; from bitalloc.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=cwd,
                            env={**os.environ, "CI": "1", **(env or {})})


def http(method: str, url: str, body=None, token: str | None = None, raw: bytes | None = None,
         headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Serve:
    """`bitalloc serve` on a free port with its own data folder; ``url``, ``token``, ``call(...)``."""

    def __init__(self, tmp: Path, *args: str, models_root: Path | None = None, env: dict | None = None):
        self.port, self.home = free_port(), tmp / "home"
        self.log = tmp / f"serve-{self.port}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        root = ["--models-root", str(models_root)] if models_root else []
        self.proc = bitalloc(["serve", "--port", str(self.port), *root, *args], self.log,
                             env={"BITALLOC_HOME": str(self.home), **(env or {})}, cwd=tmp)
        self.wait_up()
        token = self.home / "token"
        self.token = token.read_text().strip() if token.is_file() else None

    def wait_up(self, seconds: float = 90) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"bitalloc serve exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return
            except Exception:
                time.sleep(0.3)
        raise AssertionError(f"bitalloc serve did not answer in {seconds} s: {self.log.read_text()[-2000:]}")

    def call(self, method: str, path: str, body=None, *, token: str | None | bool = True, **kw):
        return http(method, self.url + path, body, token=self.token if token is True else (token or None), **kw)

    def json(self, method: str, path: str, body=None, **kw):
        status, headers, data = self.call(method, path, body, **kw)
        return status, json.loads(data) if data else None

    def wait_job(self, job_id: str, seconds: float = 300) -> dict:
        deadline = time.time() + seconds
        while time.time() < deadline:
            _, job = self.json("GET", f"/v1/jobs/{job_id}")
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not finished in {seconds} s: {job}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
