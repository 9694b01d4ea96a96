"""One flow: for a grid of settings, the Python API (`bitalloc.allocate`), the CLI (`bitalloc allocate`) and the
service (`POST /v1/plans`, a real uvicorn server and its worker) return byte-identical plan JSON on the embedded
model. Each surface only builds an AllocateConfig (alloc/config.py) and calls api.run_allocate."""
import json

import pytest

from .conftest import SMALL

# (id, the settings as AllocateConfig fields); every one on SMALL windows of the default text
GRID = [
    ("layer-default", {}),
    ("layer-closed-form", {"solver": "closed_form"}),
    ("layer-uniform", {"solver": "uniform"}),
    ("layer-checked", {"check": True}),
    ("layer-gptq-checked", {"quantizer": "gptq", "check": True}),
    ("row-default", {"granularity": "row"}),
    ("row-greedy", {"granularity": "row", "solver": "greedy"}),
    ("row-ilp", {"granularity": "row", "solver": "ilp"}),
    ("target-llama.cpp", {"target": "llama.cpp", "budget_bits": 4.6}),
    ("target-vllm", {"target": "vllm", "budget_bits": 5.0}),
    ("size-gguf", {"target": "llama.cpp", "size": 12_000_000}),          # a budget in bytes, not bits
    ("memory-gguf", {"target": "llama.cpp", "memory": 40_000_000, "context": 1024}),   # llama.cpp's whole footprint
    ("evolutionary", {"solver": "evolutionary", "generations": 2}),
]


def _without_timings(raw: bytes) -> str:
    """The plan JSON apart from wall-clock figures (a search records how long it ran)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        return [strip(v) for v in value] if isinstance(value, list) else value
    return json.dumps(strip(json.loads(raw)), indent=1)


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        if key == "budget_bits":
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("settings", [g[1] for g in GRID], ids=[g[0] for g in GRID])
def test_api_cli_and_service_give_the_same_plan(settings, server, tmp_path, monkeypatch):
    import bitalloc
    from bitalloc.cli import main
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path.parent / "parity-cache"))    # shared by the grid's cases
    budget = settings.get("budget_bits", None if {"size", "memory"} & set(settings) else 3.2)
    rest = {k: v for k, v in settings.items() if k != "budget_bits"}

    api = bitalloc.allocate(None, budget, **SMALL, **rest, progress=False).dumps().encode()

    out = tmp_path / "cli.json"
    argv = ["allocate", *(["--budget", str(budget)] if budget is not None else []), "--n-windows",
            str(SMALL["n_windows"]), "--seq-len", str(SMALL["seq_len"]), *_flags(rest), "--out", str(out)]
    assert main(argv) == 0
    cli = out.read_bytes()

    body = {"model": "refllama-s", **({"budget_bits": budget} if budget is not None else {}), **SMALL, **rest}
    status, _, served = server.call("POST", "/v1/plans?wait=600", body, timeout=660)   # as the server waits
    assert status == 200, served

    assert _without_timings(api) == _without_timings(cli), "the Python API's plan differs from the CLI's"
    assert _without_timings(served) == _without_timings(cli), "the service's plan differs from the CLI's"
    if "seconds" not in cli.decode():
        assert api == cli == served                        # byte for byte
    recorded = json.loads(cli)["extra"]["config"]
    assert recorded["budget_bits"] == budget and all(recorded[k] == v for k, v in rest.items() if k != "target")
