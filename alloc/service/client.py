"""``bitalloc.Client``: the service from Python, returning the same BitPlan as the local ``allocate``.

    client = bitalloc.Client("http://127.0.0.1:8321", token)     # token: also $BITALLOC_TOKEN
    plan = client.allocate("refllama-s", budget_bits=3.2)        # waits for a job when the table is new

Standard library only (urllib): nothing to install beyond bitalloc.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

from ..errors import BitallocError


class Client:
    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0):
        if not url.startswith(("http://", "https://")):
            raise BitallocError(f"server URL {url!r} must start with http:// or https://")
        self.url, self.timeout = url.rstrip("/"), timeout
        self.token = token if token is not None else os.environ.get("BITALLOC_TOKEN")
        self.last_plan_id: str | None = None

    # -- HTTP -------------------------------------------------------------------------------------------
    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except Exception:
                message = raw.decode(errors="replace")[:200] or e.reason
            raise BitallocError(f"the server answered {e.code}: {message}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise BitallocError(f"the server {self.url} does not answer ({reason}): is `bitalloc serve` running?") from None

    def _json(self, method: str, path: str, body: dict | None = None):
        return json.loads(self._call(method, path, body)[2])

    # -- resources --------------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        return self._json("GET", "/v1/models")

    def register(self, path: str, name: str | None = None) -> dict:
        return self._json("POST", "/v1/models", {"path": path, **({"name": name} if name else {})})

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def plan(self, plan_id: str):
        from ..plan import BitPlan
        return BitPlan.from_json(self._json("GET", f"/v1/plans/{plan_id}"), source=f"plan {plan_id}")

    def export(self, plan_id: str, fmt: str) -> str:
        return self._call("GET", f"/v1/plans/{plan_id}/export/{fmt}")[2].decode()

    def pareto(self, model: str) -> dict:
        return self._json("GET", f"/v1/models/{model}/pareto")

    def allocate(self, model: str = "refllama-s", budget_bits: float = 3.2, *, wait: bool = True,
                 poll: float = 1.0, timeout: float | None = None, progress: bool = True, **settings):
        """The plan `bitalloc allocate` would make with these settings (PlanIn's fields: granularity, solver,
        probe, quantizer, fuse, experts, options, group_size, symmetric, n_windows, seq_len, dtype). When the
        table is not stored yet, waits for the job that measures it (a progress bar), unless ``wait=False``
        (then the job's JSON is returned)."""
        from ..plan import BitPlan
        body = {"model": model, "budget_bits": budget_bits, **{k: v for k, v in settings.items() if v is not None}}
        start, bar = time.time(), None
        try:
            while True:
                status, headers, raw = self._call("POST", "/v1/plans", body)
                if status == 200:
                    self.last_plan_id = headers.get("X-Bitalloc-Plan-Id")
                    return BitPlan.from_json(json.loads(raw), source="the server's plan")
                job = json.loads(raw)
                if not wait:
                    return job
                job = self._wait(job, start, timeout, poll, progress, bar_holder := {})
                bar = bar_holder.get("bar")
                if job["state"] == "failed":
                    raise BitallocError(f"the server's job {job['id']} failed: {job['error']}")
        finally:
            if bar is not None:
                bar.close()

    def _wait(self, job: dict, start: float, timeout, poll: float, progress: bool, holder: dict) -> dict:
        from tqdm.auto import tqdm
        while job["state"] in ("queued", "running"):
            if timeout is not None and time.time() - start > timeout:
                raise BitallocError(f"the server's job {job['id']} is still {job['state']} after {timeout:g} s "
                                    f"(GET {self.url}/v1/jobs/{job['id']})")
            p = job.get("progress") or {}
            if progress and p.get("total"):
                bar = holder.get("bar") or holder.setdefault("bar", tqdm(total=p["total"], desc=f"server: {p.get('stage')}"))
                bar.total, bar.n = p["total"], p.get("done", 0)
                bar.refresh()
            time.sleep(poll)
            job = self.job(job["id"])
        return job
