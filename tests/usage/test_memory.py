"""--memory at --context (issue #34): llama.cpp's whole footprint as the budget (alloc/memory.py): the GGUF,
its KV cache and its buffers. The plan records the breakdown, what llama.cpp itself reports for the file at that
context is within 5 % of it, and every bad input is one line before any file."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

from bitalloc.cli import main

from ..conftest import REFLLAMA
from .test_size import _one_line_exit_2

FAST = ["--effort", "fast", "--n-windows", "2", "--seq-len", "64"]
BENCH = Path(__file__).resolve().parents[2] / "examples" / "bench_memory.py"


def test_the_footprint_counts_every_layer_s_cache_at_the_padded_context():
    from transformers import AutoConfig

    from bitalloc.memory import footprint
    config = AutoConfig.from_pretrained(REFLLAMA)        # 8 layers, 2 KV heads of 64
    held = footprint(config, 1000)
    assert held.cells == 1024                            # llama.cpp pads the context to 256 cells
    assert held.kv_bytes == 8 * 1024 * 2 * (2 * 64 * 2)
    assert footprint(config, 1000, "q8_0").kv_bytes == 8 * 1024 * 2 * (2 * 64 // 32 * 34)
    assert footprint(config, 1000, batch=2).kv_bytes == 2 * held.kv_bytes


@pytest.mark.slow
def test_a_memory_plan_is_what_llama_cpp_holds_at_that_context(tmp_path, capsys):
    if os.environ.get("CI") != "true":
        pytest.importorskip("llama_cpp")
    plan_path, gguf = tmp_path / "p.json", tmp_path / "m.gguf"
    asked = 40_000_000
    assert main(["allocate", "--target", "llama.cpp", "--memory", str(asked), "--context", "1024", *FAST,
                 "--out", str(plan_path)]) == 0
    assert "llama.cpp will hold" in capsys.readouterr().out
    held = json.loads(plan_path.read_text())["extra"]["memory"]
    assert held["context"] == 1024 and held["kv_type"] == "f16"
    assert 0.99 * asked <= held["predicted_bytes"] <= asked
    assert main(["apply", "--plan", str(plan_path), "--format", "gguf", "--out", str(gguf)]) == 0
    assert gguf.stat().st_size == held["weights_bytes"]
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    got = bench.reported(str(gguf), 1024, "f16")
    assert got["kv"] == held["kv_bytes"]
    assert abs(sum(got.values()) - held["predicted_bytes"]) < 0.05 * held["predicted_bytes"], got


@pytest.mark.parametrize("argv,words", [
    (["--memory", "1GiB"], ["--context"]),
    (["--context", "512", "--budget", "3"], ["--memory"]),
    (["--memory", "1GiB", "--context", "512"], ["--target llama.cpp"]),
    (["--memory", "1GiB", "--context", "512", "--size", "20MB", "--target", "llama.cpp"], ["--size", "--budget"]),
    (["--memory", "lots", "--context", "512", "--target", "llama.cpp"], ["--memory", "not a size"]),
])
def test_bad_memory_settings_are_one_line_before_any_file(argv, words, tmp_path, capsys):
    out = tmp_path / "p.json"
    line = _one_line_exit_2(["allocate", *argv, "--out", str(out)], capsys, out)
    assert all(w in line for w in words), line


@pytest.mark.slow
@pytest.mark.parametrize("argv,words", [
    (["--memory", "1GiB", "--context", "4096"], ["--context", "maximum of 1,024"]),
    (["--memory", "30MB", "--context", "1024"], ["--memory", "give at least 32MiB"]),
])
def test_a_context_or_memory_the_model_cannot_take_names_the_limit(argv, words, tmp_path, capsys):
    out = tmp_path / "p.json"
    line = _one_line_exit_2(["allocate", "--target", "llama.cpp", *argv, *FAST, "--out", str(out)], capsys, out)
    assert all(w in line for w in words), line
