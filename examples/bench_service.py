"""The plan service under load, on loopback (issue #21): a real `bitalloc serve` (embedded SQLite store, one
worker), 2,000 plan requests from 32 threads against a stored refllama-s table; then plan latency from a
Llama-3.1-8B-size table (synthetic costs, real unit shapes: 224 layers, 1.38 M rows) for layer and row plans;
then a screenshot of the plan page in headless chromium (examples/results/service_plan_page.png).

    python examples/bench_service.py [--requests 2000] [--concurrency 32] [--out examples/results/service_cpu.md]

Counts: HTTP errors, jobs (one per table request: none lost, none duplicated), plans stored (one per request).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.servers import Serve  # noqa: E402

SMALL = {"n_windows": 8, "seq_len": 128}


def llama8b_table():
    """A table with Llama-3.1-8B's 224 projection shapes and random (seeded) layer and row costs."""
    import torch

    from bitalloc.options import parse_options
    from bitalloc.sensitivity.table import SensitivityTable
    from bitalloc.units import Unit
    shapes = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096), "self_attn.v_proj": (1024, 4096),
              "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
              "mlp.down_proj": (4096, 14336)}
    units = [Unit(f"model.layers.{i}.{n}", s) for i in range(32) for n, s in shapes.items()]
    options = parse_options(None)
    g = torch.Generator().manual_seed(0)
    rows = sum(u.shape[0] for u in units)
    decay = torch.tensor([4.0 ** -(o.bits - 2) for o in options], dtype=torch.float64)
    row_cost = torch.rand(rows, 1, generator=g, dtype=torch.float64) * decay * 1e-6
    off, cost = 0, []
    for u in units:
        cost.append(row_cost[off:off + u.shape[0]].sum(0))
        off += u.shape[0]
    meta = {"probe": "synthetic", "model": {"id": "llama-3.1-8b-shapes", "hash": "synthetic-8b"}}
    return SensitivityTable(units, options, torch.stack(cost), meta, row_cost)


def store_8b(home: Path) -> dict:
    """The synthetic table in the store, as a done job of the request {model: llama-3.1-8b-shapes}."""
    from bitalloc.service import catalog
    from bitalloc.service.store import JobRow, ModelRow, Store, new_id
    table = llama8b_table()
    store = Store(f"sqlite:///{home}/store.db")
    model = ModelRow(id="llama-3.1-8b-shapes", path="@synthetic", architecture="LlamaForCausalLM",
                     hash="synthetic-8b", n_params=sum(u.numel for u in table.units),
                     units=[[u.name, list(u.shape)] for u in table.units])
    with store.session() as s:
        s.add(model)
        s.commit()
    row = catalog.table_row_from(table, "synthetic-8b", {}, model, "rtn", 0.0)
    with store.session() as s:
        s.add(row)
        treq = catalog.table_request(model, {})
        s.add(JobRow(id=new_id("job"), kind="table", request_key=catalog.request_key(treq), request=treq,
                     model_id=model.id, state="done", attempts=1, progress={}, table_id=row.id))
        s.commit()
    return {"rows": table.row_cost.shape[0], "units": len(table.units), "bytes": len(row.data)}


def load(server: Serve, n: int, concurrency: int, distinct: int) -> dict:
    """``n`` requests over ``distinct`` budgets from 2.5 bits up (repeats are answered by the plan made)."""
    step = 2.0 / distinct
    budgets = [round(2.5 + step * (i % distinct), 4) for i in range(n)]
    latencies, errors, lock, it = [], [], threading.Lock(), iter(budgets)

    def client():
        while True:
            with lock:
                b = next(it, None)
            if b is None:
                return
            t = time.perf_counter()
            status, _, body = server.call("POST", "/v1/plans", {"model": "refllama-s", "budget_bits": b, **SMALL})
            dt = time.perf_counter() - t
            with lock:
                latencies.append(dt)
                if status != 200 or json.loads(body)["true_bpw"] > b + 1e-9:
                    errors.append((status, body[:200]))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {"n": len(latencies), "errors": len(errors), "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
            "rps": len(latencies) / wall, "first_error": errors[:1]}


def timed(server: Serve, bodies: list[dict]) -> float:
    """The median milliseconds of one request for each body (distinct budgets: each one solved)."""
    out = []
    for body in bodies:
        t = time.perf_counter()
        status, _, raw = server.call("POST", "/v1/plans", body, timeout=600)
        assert status == 200, raw[:300]
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "examples" / "results" / "service_cpu.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bitalloc-bench-service-"))
    (tmp / "home").mkdir()
    big = store_8b(tmp / "home")
    server = Serve(tmp, env={"BITALLOC_CACHE": str(tmp / "cache")})
    try:
        t = time.perf_counter()
        status, headers, _ = server.call("POST", "/v1/plans?wait=600", {"model": "refllama-s", "budget_bits": 3.2,
                                                                         **SMALL})
        assert status == 200
        shown = headers["x-bitalloc-plan-id"]                      # the 3.2-bit plan: the screenshot's page
        first = time.perf_counter() - t
        sequential = timed(server, [{"model": "refllama-s", "budget_bits": 2.6 + 0.0137 * i, **SMALL}
                                    for i in range(50)])
        fresh = load(server, args.requests, args.concurrency, args.requests)
        repeated = load(server, args.requests, args.concurrency, 20)
        _, jobs = server.json("GET", "/v1/jobs?limit=1000")
        from bitalloc.service.store import PlanRow, Store
        with Store(f"sqlite:///{tmp}/home/store.db").session() as s:
            plans = s.query(PlanRow).filter(PlanRow.model_id == "refllama-s").count()
        layer_8b = timed(server, [{"model": "llama-3.1-8b-shapes", "budget_bits": 3.0 + 0.1 * i} for i in range(5)])
        t = time.perf_counter()
        timed(server, [{"model": "llama-3.1-8b-shapes", "budget_bits": 2.9, "granularity": "row"}])
        first_row = time.perf_counter() - t
        row_8b = timed(server, [{"model": "llama-3.1-8b-shapes", "budget_bits": 3.0 + 0.1 * i, "granularity": "row"}
                                for i in range(5)])
        shot = REPO / "examples" / "results" / "service_plan_page.png"
        chromium = shutil.which("chromium")
        if chromium:
            subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            "--virtual-time-budget=8000", f"--screenshot={shot}", "--window-size=1280,2000",
                            f"{server.url}/plans/{shown}"], capture_output=True, timeout=120)
    finally:
        server.stop()
    refllama_jobs = [j for j in jobs if j["model"] == "refllama-s"]
    lines = [
        "# bitalloc serve under load (CPU, loopback)", "",
        f"Command: `python examples/bench_service.py --requests {args.requests} --concurrency {args.concurrency}` "
        "on the 2-core CPU machine; embedded SQLite store, one uvicorn process.", "",
        f"First request (table measured by the embedded worker, refllama-s fisher {SMALL['n_windows']}×"
        f"{SMALL['seq_len']}, ?wait): {first:.1f} s", "",
        "| test | requests | errors | p50 ms | p99 ms | req/s |", "|---|---|---|---|---|---|",
        f"| refllama-s layer plans (ilp), 50 distinct budgets, one at a time | 50 | 0 | {sequential:.1f} | – | – |",
        *(f"| refllama-s layer plans (ilp), {label}, {args.concurrency} concurrent | {r['n']} | "
          f"{r['errors']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rps']:.1f} |"
          for label, r in ((f"{args.requests} distinct budgets (each solved)", fresh),
                           ("20 budgets repeated (answered by the stored plan)", repeated))),
        f"| Llama-3.1-8B-size table ({big['units']} layers), layer plan (ilp), 5 budgets, sequential | 5 | 0 | "
        f"{layer_8b:.0f} | – | – |",
        f"| Llama-3.1-8B-size table ({big['rows']:,} rows), row plan (closed_form), 5 budgets, sequential | 5 | 0 | "
        f"{row_8b:.0f} | – | – |",
        "", f"The first row plan of the 8B-size table (the row knapsack and its hull built, then kept): "
        f"{first_row * 1e3:.0f} ms.",
        "", f"Jobs for refllama-s: {len(refllama_jobs)} (one table request: 0 lost, "
        f"{len(refllama_jobs) - 1} duplicated); plans stored for it: {plans}, one per distinct request "
        "(repeats are answered with the plan made the first time).",
        f"8B-size table in the store: {big['bytes'] / 2**20:.1f} MiB (layer + row costs, float64).", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    for r in (fresh, repeated):
        if r["first_error"]:
            print("first error:", r["first_error"])


if __name__ == "__main__":
    main()
