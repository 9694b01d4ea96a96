"""Bad input, across every command and the Python API: one `bitalloc: error:` line (a one-line
BitallocError in Python), exit status 2, no traceback, and no file left behind."""
import json
import os
import re
import shutil

import pytest
import torch
from bitalloc.cli import main
from bitalloc.errors import BitallocError

FAST = ["--seq-len", "32", "--n-windows", "2"]


@pytest.fixture(scope="module")
def ctx(tiny_llama_dir, tmp_path_factory):
    """Files every case may point at: a good plan and table for the tiny model, junk inputs of each kind."""
    d = tmp_path_factory.mktemp("bad_input")
    from bitalloc.calibration import default_text
    (d / "text.txt").write_text(default_text()[:40000])
    os.environ["BITALLOC_CACHE"] = str(d / "cache")
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(d / "text.txt"), "--budget", "3.2",
                 "--out", str(d / "plan.json"), *FAST]) == 0
    assert main(["probe", "--model", str(tiny_llama_dir), "--calib", str(d / "text.txt"), "--out",
                 str(d / "table.csv"), *FAST]) == 0
    (d / "empty.txt").write_text("")
    (d / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40)
    (d / "random.bin").write_bytes(torch.randint(128, 256, (20000,), generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.uint8).numpy().tobytes())
    (d / "repeated.txt").write_text("a " * 20000)
    (d / "adir").mkdir()
    (d / "notamodel").mkdir()
    (d / "notjson.json").write_text("{not json")
    plan = json.loads((d / "plan.json").read_text())
    plan["layers"]["model.layers.0.self_attn.q_proj"]["bits"] = "three"
    (d / "wrongtypes.json").write_text(json.dumps(plan))
    other = json.loads((d / "plan.json").read_text())
    other["layers"] = {k.replace("layers.0", "layers.9"): v for k, v in other["layers"].items()}
    (d / "otherplan.json").write_text(json.dumps(other))
    from bitalloc import api                 # a row plan as the row solver makes it (no check on the model)
    prepared = api.prepare(tiny_llama_dir, calib_file=d / "text.txt", seq_len=32, n_windows=2)
    api.solve(api.measure(prepared, "fisher"), 3.2, "closed_form", granularity="row").save(d / "rowplan.json")
    assert json.loads((d / "rowplan.json").read_text())["version"] == 2
    rows = (d / "table.csv").read_text().splitlines()
    cols = rows[0].split(",")
    k = cols.index("size_bits")
    (d / "halfbits.csv").write_text("\n".join([rows[0]] + [",".join(c if i != k else c + ".5" for i, c in
                                                                     enumerate(r.split(","))) for r in rows[1:]]))
    trunc = d / "truncated"
    shutil.copytree(tiny_llama_dir, trunc)
    weights = trunc / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    (d / "packed").mkdir()
    (d / "packed" / "x").write_text("taken")
    (d / "afile").write_text("x")
    (d / "work").mkdir()          # outputs of the cases go here: it must stay empty
    return {"d": d, "model": str(tiny_llama_dir)}


def P(name):
    """A placeholder for a path inside the case folder."""
    return ("path", name)


ALLOC = ["allocate", "--model", "MODEL", "--calib", P("text.txt"), *FAST]
# (id, argv, what the error line must mention)
CLI_CASES = [
    ("budget-not-a-number", [*ALLOC, "--budget", "abc", "--out", P("work/p.json")], "not a number"),
    ("budget-negative", [*ALLOC, "--budget", "-1", "--out", P("work/p.json")], "> 0"),
    ("budget-nan", [*ALLOC, "--budget", "nan", "--out", P("work/p.json")], "finite"),
    ("budget-below-cheapest", [*ALLOC, "--budget", "1.5", "--out", P("work/p.json")], "infeasible"),
    ("budget-missing", [*ALLOC, "--out", P("work/p.json")], "--budget"),
    ("unknown-flag", [*ALLOC, "--budget", "3", "--budgett", "3", "--out", P("work/p.json")], "unrecognized"),
    ("model-missing", ["allocate", "--model", P("nothere"), "--budget", "3", "--out", P("work/p.json")], "does not exist"),
    ("model-not-a-folder", ["allocate", "--model", P("text.txt"), "--budget", "3", "--out", P("work/p.json")],
     "not a GGUF file"),
    ("model-no-config", ["allocate", "--model", P("notamodel"), "--budget", "3", "--out", P("work/p.json")],
     "not a model folder"),
    ("model-truncated-safetensors", ["allocate", "--model", P("truncated"), "--budget", "3", *FAST,
                                     "--out", P("work/p.json")], "truncated"),
    ("calib-missing", [*ALLOC[:4], P("nothere.txt"), *FAST, "--budget", "3", "--out", P("work/p.json")], "does not exist"),
    ("calib-directory", [*ALLOC[:4], P("adir"), *FAST, "--budget", "3", "--out", P("work/p.json")], "directory"),
    ("calib-empty", [*ALLOC[:4], P("empty.txt"), *FAST, "--budget", "3", "--out", P("work/p.json")], "empty"),
    ("calib-png", [*ALLOC[:4], P("image.png"), *FAST, "--budget", "3", "--out", P("work/p.json")], "not text"),
    ("calib-random-bytes", [*ALLOC[:4], P("random.bin"), *FAST, "--budget", "3", "--out", P("work/p.json")],
     "not UTF-8"),
    ("calib-one-token-repeated", [*ALLOC[:4], P("repeated.txt"), *FAST, "--budget", "3", "--out", P("work/p.json")],
     "distinct tokens"),
    ("n-windows-zero", [*ALLOC, "--n-windows", "0", "--budget", "3", "--out", P("work/p.json")], "≥ 1"),
    ("seq-len-zero", [*ALLOC, "--seq-len", "0", "--budget", "3", "--out", P("work/p.json")], "≥ 1"),
    ("seq-len-negative", [*ALLOC, "--seq-len", "-5", "--budget", "3", "--out", P("work/p.json")], "≥ 1"),
    ("eval-windows-zero", [*ALLOC, "--eval", P("text.txt"), "--eval-windows", "0", "--budget", "3",
                           "--out", P("work/p.json")], "≥ 1"),
    ("group-size-zero", [*ALLOC, "--group-size", "0", "--budget", "3", "--out", P("work/p.json")], "≥ 1"),
    ("generations-zero", [*ALLOC, "--generations", "0", "--budget", "3", "--out", P("work/p.json")], "≥ 1"),
    ("time-limit-negative", [*ALLOC, "--time-limit", "-1", "--budget", "3", "--out", P("work/p.json")], "> 0"),
    ("out-is-directory", [*ALLOC, "--budget", "3", "--out", P("adir")], "is a directory"),
    ("out-parent-missing", [*ALLOC, "--budget", "3", "--out", P("nothere/p.json")], "does not exist"),
    ("probe-unknown", [*ALLOC, "--probe", "magic", "--budget", "3", "--out", P("work/p.json")], "invalid choice: 'magic'"),
    ("solver-unknown", [*ALLOC, "--solver", "magic", "--budget", "3", "--out", P("work/p.json")], "unknown --solver"),
    ("options-garbled", [*ALLOC, "--options", "2,x", "--budget", "3", "--out", P("work/p.json")], "not understood"),
    ("include-unsupported", [*ALLOC, "--include", "model.norm", "--budget", "3", "--out", P("work/p.json")], "norm"),
    ("eval-file-missing", [*ALLOC, "--eval", P("nothere.txt"), "--budget", "3", "--out", P("work/p.json")],
     "does not exist"),
    ("dtype-unknown", [*ALLOC, "--dtype", "int8", "--budget", "3", "--out", P("work/p.json")], "invalid choice"),
    ("experts-on-dense", [*ALLOC, "--experts", "per-layer", "--budget", "3", "--out", P("work/p.json")],
     "no MoE experts"),
    ("stream-garbled", [*ALLOC, "--probe", "block_similarity", "--stream", "sometimes", "--budget", "3",
                        "--out", P("work/p.json")], "invalid choice"),
    ("baselines-without-eval", [*ALLOC, "--baselines", "llama.cpp", "--budget", "3", "--out", P("work/p.json")],
     "--eval"),
    ("device-unknown", [*ALLOC, "--device", "tpu", "--budget", "3", "--out", P("work/p.json")], "--device"),
    ("probe-out-is-directory", ["probe", "--model", "MODEL", *FAST, "--out", P("adir")], "is a directory"),
    ("probe-out-missing", ["probe", "--model", "MODEL", *FAST], "--out"),
    ("solve-table-is-plan", ["solve", "--table", P("plan.json"), "--budget", "3", "--out", P("work/p.json")],
     "JSON"),
    ("solve-table-missing", ["solve", "--table", P("nothere.csv"), "--budget", "3", "--out", P("work/p.json")],
     "does not exist"),
    ("solve-table-empty", ["solve", "--table", P("empty.txt"), "--budget", "3", "--out", P("work/p.json")], "columns"),
    ("solve-table-fractional-size", ["solve", "--table", P("halfbits.csv"), "--budget", "3",
                                     "--out", P("work/p.json")], "size_bits"),
    ("solve-out-is-directory", ["solve", "--table", P("table.csv"), "--budget", "3", "--out", P("adir")],
     "is a directory"),
    ("solve-rows-from-a-csv", ["solve", "--table", P("table.csv"), "--budget", "3", "--granularity", "row",
                               "--out", P("work/p.json")], "no row costs"),
    ("row-granularity-probe-without-rows", [*ALLOC, "--granularity", "row", "--probe", "hessian_trace", "--budget", "3",
                                            "--out", P("work/p.json")], "no per-row costs"),
    ("row-granularity-unknown-solver", [*ALLOC, "--granularity", "row", "--solver", "uniform", "--budget", "3",
                                        "--out", P("work/p.json")], "has no row granularity"),
    ("export-exact-row-plan", ["export", P("rowplan.json"), "--to", "llama.cpp", "--exact",
                               "--out", P("work/t.txt")], "cannot express"),
    ("solve-needs-model-solver", ["solve", "--table", P("table.csv"), "--budget", "3", "--solver", "evolutionary",
                                  "--out", P("work/p.json")], "solver"),
    ("eval-plan-missing", ["eval", "--model", "MODEL", "--plan", P("nothere.json"), "--text", P("text.txt")],
     "does not exist"),
    ("eval-plan-not-json", ["eval", "--model", "MODEL", "--plan", P("notjson.json"), "--text", P("text.txt")],
     "not valid JSON"),
    ("eval-plan-wrong-types", ["eval", "--model", "MODEL", "--plan", P("wrongtypes.json"), "--text", P("text.txt")],
     "must be an integer"),
    ("eval-plan-other-model", ["eval", "--model", "MODEL", "--plan", P("otherplan.json"), "--text",
                               P("text.txt"), "--seq-len", "32", "--n-windows", "2"], "another model"),
    ("eval-text-missing", ["eval", "--model", "MODEL", "--plan", P("plan.json"), "--text", P("nothere.txt")],
     "does not exist"),
    ("eval-windows-zero", ["eval", "--model", "MODEL", "--plan", P("plan.json"), "--text", P("text.txt"),
                           "--eval-windows", "0"], "≥ 1"),
    ("apply-device-unknown", ["apply", "--model", "MODEL", "--plan", P("plan.json"), "--out", P("work/packed"),
                              "--device", "tpu"], "--device"),
    ("eval-device-unknown", ["eval", "--model", "MODEL", "--plan", P("plan.json"), "--text", P("text.txt"),
                             "--device", "npu"], "--device"),
    ("apply-out-not-empty", ["apply", "--model", "MODEL", "--plan", P("plan.json"), "--out", P("packed")], "not empty"),
    ("apply-out-is-file", ["apply", "--model", "MODEL", "--plan", P("plan.json"), "--out", P("afile")], "is a file"),
    ("apply-n-windows-zero", ["apply", "--model", "MODEL", "--plan", P("plan.json"), "--out", P("work/packed"),
                              "--n-windows", "0"], "≥ 1"),
    ("apply-plan-wrong-types", ["apply", "--model", "MODEL", "--plan", P("wrongtypes.json"),
                                "--out", P("work/packed")], "must be an integer"),
    ("export-unknown-format", ["export", P("plan.json"), "--to", "awq", "--out", P("work/x.json")], "awq"),
    ("export-out-is-directory", ["export", P("plan.json"), "--to", "gptqmodel", "--out", P("adir")], "is a directory"),
    ("export-plan-missing", ["export", P("nothere.json"), "--to", "gptqmodel", "--out", P("work/x.json")],
     "does not exist"),
    ("sweep-budgets-reversed", ["sweep", "--model", "MODEL", "--budgets", "4:2:0.25", "--out-dir", P("work/s")],
     "--budgets"),
    ("sweep-budgets-garbled", ["sweep", "--model", "MODEL", "--budgets", "abc", "--out-dir", P("work/s")], "--budgets"),
    ("sweep-out-dir-is-file", ["sweep", "--model", "MODEL", "--out-dir", P("afile")], "is a file"),
    ("sweep-eval-windows-zero", ["sweep", "--model", "MODEL", "--eval", P("text.txt"), "--eval-windows", "0",
                                 "--out-dir", P("work/s")], "≥ 1"),
    ("report-out-is-directory", ["report", P("plan.json"), "--out", P("adir")], "is a directory"),
    ("report-table-is-plan", ["report", P("plan.json"), "--table", P("plan.json"), "--out", P("work/r.html")],
     "JSON"),
    ("search-n-trials-zero", ["search", "--model", "MODEL", "--study", "s", "--n-trials", "0"], "≥ 1"),
    ("search-windows-zero", ["search", "--model", "MODEL", "--study", "s", "--windows", "0"], "≥ 1"),
    ("search-storage-bogus", ["search", "--model", "MODEL", "--study", "s", "--storage", "bogus://x",
                              "--out", P("work/b.json")], "storage"),
    ("dashboard-port-out-of-range", ["dashboard", "--port", "70000"], "port"),
]


def _argv(case, ctx):
    return [str(ctx["d"] / a[1]) if isinstance(a, tuple) else ctx["model"] if a == "MODEL" else a for a in case]


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if "cache" not in p.parts)


def _is_progress(line: str) -> bool:
    return "%|" in line or "it/s]" in line or "s/it]" in line


@pytest.mark.parametrize("argv,mentions", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(argv, mentions, ctx, capsys, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(ctx["d"] / "cache"))
    monkeypatch.chdir(ctx["d"] / "work")
    before = _files(ctx["d"])
    try:
        code = main(_argv(argv, ctx))
    except SystemExit as e:            # argparse
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not _is_progress(line)]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("bitalloc: error: "), lines
    assert mentions.lower() in lines[0].lower(), lines[0]
    assert _files(ctx["d"]) == before, "a file was left behind"


def _float8_model():
    """A tiny Llama whose first MLP holds float8 weights: no quantizer or kernel takes them."""
    from bitalloc.models import zoo
    model = zoo.tiny("llama3")
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(up.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    return model


def _api_cases():
    import bitalloc
    from bitalloc.models.loading import load_model
    from bitalloc.plan import BitPlan

    def with_model(ctx, fn):
        model, tok, _ = load_model(ctx["model"])
        return fn(model, tok)

    small = {"n_windows": 2, "seq_len": 32}
    return [
        ("budget-string", lambda c: with_model(c, lambda m, t: bitalloc.allocate(m, budget_bits="3.2", tokenizer=t)),
         "must be a number"),
        ("budget-negative", lambda c: bitalloc.allocate(c["model"], budget_bits=-1), "> 0"),
        ("budget-nan", lambda c: bitalloc.allocate(c["model"], budget_bits=float("nan")), "finite"),
        ("budget-bool", lambda c: bitalloc.allocate(c["model"], budget_bits=True), "must be a number"),
        ("n-windows-zero", lambda c: bitalloc.allocate(c["model"], 3.2, n_windows=0), "≥ 1"),
        ("seq-len-float", lambda c: bitalloc.allocate(c["model"], 3.2, seq_len=32.5), "whole number"),
        ("probe-unknown", lambda c: bitalloc.allocate(c["model"], 3.2, probe="magic"), "unknown probe"),
        ("solver-unknown", lambda c: bitalloc.allocate(c["model"], 3.2, solver="magic"), "unknown solver"),
        ("dtype-unknown", lambda c: bitalloc.allocate(c["model"], 3.2, dtype="int8"), "unknown dtype"),
        ("experts-unknown", lambda c: bitalloc.allocate(c["model"], 3.2, experts="some", **small), "experts"),
        ("dtype-float8", lambda c: bitalloc.allocate(c["model"], 3.2, dtype=torch.float8_e4m3fn), "unknown dtype"),
        ("weights-float8", lambda c: bitalloc.allocate(_float8_model(), 3.2, calibration=torch.zeros(2, 16).long()),
         "float8_e4m3fn weights"),
        ("model-missing", lambda c: bitalloc.allocate(str(c["d"] / "nothere"), 3.2), "does not exist"),
        ("model-wrong-type", lambda c: bitalloc.allocate(42, 3.2), "nn.Module"),
        ("options-garbled", lambda c: bitalloc.allocate(c["model"], 3.2, options="2,x", **small), "not understood"),
        ("calibration-junk", lambda c: bitalloc.allocate(c["model"], 3.2, calibration="a " * 5000, **small),
         "distinct tokens"),
        ("apply-plan-missing", lambda c: with_model(c, lambda m, t: bitalloc.apply(m, str(c["d"] / "nothere.json"))),
         "does not exist"),
        ("apply-other-model", lambda c: with_model(c, lambda m, t: bitalloc.apply(m, str(c["d"] / "otherplan.json"))),
         "another model"),
        ("apply-not-a-module", lambda c: bitalloc.apply("model", BitPlan.load(c["d"] / "plan.json")), "nn.Module"),
        ("apply-quantizer-unknown", lambda c: with_model(c, lambda m, t: bitalloc.apply(
            m, BitPlan.load(c["d"] / "plan.json"), quantizer="awq")), "unknown quantizer"),
        ("save-into-taken-folder", lambda c: with_model(c, lambda m, t: bitalloc.packed.save(
            bitalloc.apply(m, BitPlan.load(c["d"] / "plan.json"), progress=False), c["d"] / "packed")), "not empty"),
        ("load-missing", lambda c: bitalloc.packed.load(c["d"] / "nothere"), "nothere"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(case, ctx, monkeypatch):
    _, call, mentions = case
    monkeypatch.setenv("BITALLOC_CACHE", str(ctx["d"] / "cache"))
    before = _files(ctx["d"])
    with pytest.raises(BitallocError) as info:
        call(ctx)
    message = str(info.value)
    assert "\n" not in message and mentions.lower() in message.lower(), message
    assert _files(ctx["d"]) == before


def test_the_table_is_large():
    assert len(CLI_CASES) + len(API_CASES) >= 40


def test_fractional_looking_integer_size_bits_load(ctx, tmp_path):
    """A table whose size_bits a spreadsheet wrote as 35072.0 is read as the integer it is."""
    from bitalloc.sensitivity.table import SensitivityTable
    rows = (ctx["d"] / "table.csv").read_text().splitlines()
    k = rows[0].split(",").index("size_bits")
    text = "\n".join([rows[0]] + [",".join(c + ".0" if i == k else c for i, c in enumerate(r.split(",")))
                                  for r in rows[1:]])
    (tmp_path / "t.csv").write_text(text)
    a, b = SensitivityTable.load_csv(ctx["d"] / "table.csv"), SensitivityTable.load_csv(tmp_path / "t.csv")
    assert torch.equal(a.cost, b.cost) and [u.name for u in a.units] == [u.name for u in b.units]


def test_corrupt_cache_entry_is_reported_and_remeasured(tiny_llama_dir, calib_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    args = ["probe", "--model", str(tiny_llama_dir), "--calib", str(calib_file), *FAST, "--out"]
    assert main([*args, str(tmp_path / "a.csv")]) == 0
    entries = list((tmp_path / "cache" / "tables").glob("*.safetensors"))
    assert len(entries) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:40])          # truncated on disk
    capsys.readouterr()
    assert main([*args, str(tmp_path / "b.csv")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("bitalloc: warning:")]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "measured" in captured.out
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert main([*args, str(tmp_path / "c.csv")]) == 0        # the entry was rewritten: now a clean hit
    assert "cache" in capsys.readouterr().out


def test_calibration_says_what_it_used_and_warns_when_short(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    from bitalloc.calibration import default_text
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    (tmp_path / "short.txt").write_text(default_text()[:3000])
    code = main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(tmp_path / "short.txt"), "--seq-len",
                 "64", "--n-windows", "500", "--budget", "3.2", "--out", str(tmp_path / "p.json")])
    out = capsys.readouterr()
    assert code == 0
    m = re.search(r"calibration: (\d+) windows × 64 tokens", out.out)
    assert m and 1 <= int(m.group(1)) < 500
    assert re.search(rf"bitalloc: warning: .*gives {m.group(1)} windows of 64 tokens, fewer than the 500", out.err)
