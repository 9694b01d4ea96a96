"""The bitalloc command: the main job on a tiny model, and every kind of bad input the spine names."""
import json
import os
import subprocess
import sys

import pytest
import torch

from bitalloc.cli import main

FAST = ["--seq-len", "64", "--n-windows", "4"]


def run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:                 # a usage mistake argparse answers (exit 2)
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_allocate_writes_plan_and_table(tiny_llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code, stdout, _ = run(["allocate", "--model", tiny_llama_dir, "--calib", calib_file, "--budget", "3.2",
                           "--out", out, *FAST, "--eval", calib_file, "--eval-windows", "2"], capsys)
    assert code == 0
    plan = json.loads(out.read_text())
    assert plan["format"] == "bitalloc.plan" and plan["true_bpw"] <= 3.2
    assert "model.layers.0.self_attn.q_proj" in plan["layers"] and "true" in stdout
    assert "uniform" in stdout and "ppl" in stdout
    assert plan["extra"]["eval"]["fp"]["ppl"] > 1


def test_probe_then_solve(tiny_llama_dir, calib_file, tmp_path, capsys):
    table = tmp_path / "t.csv"
    code, _, _ = run(["probe", "--model", tiny_llama_dir, "--calib", calib_file, "--probe", "output_error",
                      "--out", table, *FAST], capsys)
    assert code == 0
    header = table.read_text().splitlines()[0].split(",")
    assert header[:2] == ["unit", "bits"] and {"group_size", "cost", "size_bits"} <= set(header)
    code, stdout, _ = run(["solve", "--table", table, "--budget", "2.8", "--out", tmp_path / "p.json"], capsys)
    assert code == 0 and json.loads((tmp_path / "p.json").read_text())["true_bpw"] <= 2.8


@pytest.mark.parametrize("budget,match", [("1.5", r"infeasible.*--budget ≥ 2\.\d+"), ("17", "out of range")])
def test_bad_budget(tiny_llama_dir, calib_file, tmp_path, capsys, budget, match):
    out = tmp_path / "plan.json"
    code, _, err = run(["allocate", "--model", tiny_llama_dir, "--calib", calib_file, "--budget", budget,
                        "--out", out, *FAST, "--probe", "output_error"], capsys)
    import re
    lines = [line for line in err.splitlines() if line.startswith("bitalloc: error:")]
    assert code == 2 and len(lines) == 1 and re.search(match, lines[0]) and not out.exists()


def test_bad_model_paths(tmp_path, capsys):
    code, _, err = run(["allocate", "--model", tmp_path / "missing", "--budget", "3", "--out", tmp_path / "p.json"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "notamodel").mkdir()
    code, _, err = run(["allocate", "--model", tmp_path / "notamodel", "--budget", "3", "--out", tmp_path / "p.json"], capsys)
    assert code == 2 and "not a model folder" in err and not (tmp_path / "p.json").exists()


def test_bad_calibration(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run(["allocate", "--model", tiny_llama_dir, "--calib", empty, "--budget", "3", "--out",
                        tmp_path / "p.json"], capsys)
    assert code == 2 and "empty" in err
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass")
    code, _, err = run(["allocate", "--model", tiny_llama_dir, "--calib", short, "--budget", "3", "--out",
                        tmp_path / "p.json"], capsys)
    assert code == 2 and "shorter than one window" in err and not (tmp_path / "p.json").exists()


def test_nan_weights(tiny_llama_dir, tmp_path, calib_file, capsys):
    from transformers import AutoModelForCausalLM
    import shutil
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    bad = tmp_path / "nan_model"
    model.save_pretrained(bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / f, bad / f)
    code, _, err = run(["allocate", "--model", bad, "--calib", calib_file, "--budget", "3", "--out",
                        tmp_path / "p.json", *FAST], capsys)
    assert code == 2 and "model.layers.1.mlp.down_proj" in err and "NaN" in err


def test_include_unsupported(tiny_llama_dir, calib_file, tmp_path, capsys):
    code, _, err = run(["allocate", "--model", tiny_llama_dir, "--calib", calib_file, "--budget", "3",
                        "--include", "model.norm", "--out", tmp_path / "p.json", *FAST], capsys)
    assert code == 2 and "cannot quantize" in err


def test_eval_prints_fp_and_plan_scores(tiny_llama_dir, calib_file, tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "3.5",
                 "--out", str(path), *FAST]) == 0
    capsys.readouterr()
    code, out, _ = run(["eval", "--model", tiny_llama_dir, "--plan", path, "--text", calib_file, *FAST,
                        "--eval-windows", "2"], capsys)
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert code == 0 and set(rows) == {"fp", "plan"} and "2 windows of 64 tokens" in out
    assert rows["fp"][1] == "16" and float(rows["fp"][3]) == 0.0
    assert float(rows["plan"][1]) <= 3.5 and float(rows["plan"][2]) > 1 and float(rows["plan"][3]) > 0


def test_plan_for_another_model(tiny_llama_dir, calib_file, tmp_path, capsys):
    plan = {"format": "bitalloc.plan", "version": 1, "budget_bits": 3, "solver": "x", "probe": "y",
            "layers": {"encoder.layer.0.query": {"bits": 3, "group_size": 128, "symmetric": False, "shape": [8, 8]}}}
    path = tmp_path / "other.json"
    path.write_text(json.dumps(plan))
    code, _, err = run(["eval", "--model", tiny_llama_dir, "--plan", path, "--text", calib_file, "--seq-len", "64",
                        "--n-windows", "2"], capsys)
    assert code == 2 and "encoder.layer.0.query" in err and "another model" in err


def test_wrong_types_in_plan(tiny_llama_dir, calib_file, tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"format": "bitalloc.plan", "version": 1, "layers": {"a": {"bits": "three"}}}))
    code, _, err = run(["eval", "--model", tiny_llama_dir, "--plan", path, "--text", calib_file], capsys)
    assert code == 2 and "'bits' must be an integer" in err


def test_console_script_is_installed():
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "bitalloc"), "--help"], capture_output=True,
                         text=True)
    assert res.returncode == 0 and "allocate" in res.stdout


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from bitalloc.files import atomic_path
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    from bitalloc.files import atomic_write_text
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


def test_probe_refuses_short_calibration_and_bad_options(tiny_llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "t.csv"
    code, _, err = run(["probe", "--model", tiny_llama_dir, "--calib", calib_file, "--seq-len", "64",
                        "--n-windows", "100000", "--out", out], capsys)
    assert code == 2 and "fewer than the 100000 requested" in err and not out.exists()
    code, _, err = run(["probe", "--model", tiny_llama_dir, "--calib", calib_file, "--options", "3,7",
                        "--out", out, *FAST], capsys)
    assert code == 2 and "7-bit weights cannot be stored" in err and not out.exists()
    code, _, err = run(["probe", "--model", tiny_llama_dir, "--calib", calib_file, "--probe", "hawq",
                        "--out", out, *FAST], capsys)
    assert code == 2 and "invalid choice: 'hawq'" in err and not out.exists()


def test_solve_rejects_bad_tables(tmp_path, capsys):
    head = "unit,bits,group_size,symmetric,cost,size_bits,out_features,in_features,fused_group\n"
    row = lambda u, b, c: f"{u},{b},128,false,{c},{ {2: 35072, 3: 51584, 4: 68096, 8: 134144}[b] },128,128,\n"
    cases = {
        "missing": (head + row("a", 2, 1.0) + row("a", 3, 0.5) + row("b", 2, 1.0), "lacks options"),
        "negative": (head + row("a", 2, -1.0) + row("a", 3, 0.5), "negative or NaN"),
        "nan": (head + row("a", 2, "nan") + row("a", 3, 0.5), "negative or NaN"),
        "duplicate": (head + row("a", 2, 1.0) + row("a", 2, 1.0), "twice"),
    }
    for name, (text, match) in cases.items():
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        code, _, err = run(["solve", "--table", path, "--budget", "3", "--out", tmp_path / "p.json"], capsys)
        assert code == 2 and match in err, (name, err)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("command", ["allocate", "probe", "solve", "eval", "apply", "search", "export", "sweep",
                                     "report", "dashboard"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and f"usage: bitalloc {command}" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_apply_and_eval_on_cuda_without_a_gpu_is_one_line(tiny_llama_dir, calib_file, tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "3.5",
                 "--out", str(path), *FAST]) == 0
    capsys.readouterr()
    for argv in (["apply", "--model", tiny_llama_dir, "--plan", path, "--out", tmp_path / "packed", *FAST],
                 ["eval", "--model", tiny_llama_dir, "--plan", path, "--text", calib_file, *FAST]):
        code, _, err = run([*argv, "--device", "cuda"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "no CUDA device" in err
    assert not (tmp_path / "packed").exists()


def test_apply_and_eval_calibrate_on_the_plan_s_own_calibration_unless_told(tmp_path):
    """A plan records its config: apply/eval default --calib, --n-windows and --seq-len to it (GPTQ then fits the
    windows the probe measured); flags given win; a recorded file that is gone warns and uses the default."""
    import argparse
    import warnings

    from bitalloc.cli.common import plan_calibration
    from bitalloc.errors import BitallocWarning
    from bitalloc.plan import BitPlan
    calib = tmp_path / "calib.txt"
    calib.write_text("text")
    plan = BitPlan({}, {}, extra={"config": {"calib": str(calib), "n_windows": 4, "seq_len": 64}})
    args = argparse.Namespace(calib=None, n_windows=None, seq_len=None)
    plan_calibration(args, plan)
    assert (args.calib, args.n_windows, args.seq_len) == (str(calib), 4, 64)
    args = argparse.Namespace(calib=None, n_windows=16, seq_len=None)
    plan_calibration(args, plan)
    assert (args.n_windows, args.seq_len) == (16, 64)
    calib.unlink()
    args = argparse.Namespace(calib=None, n_windows=None, seq_len=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan_calibration(args, plan)
    assert args.calib is None and any(issubclass(w.category, BitallocWarning) and "not here" in str(w.message)
                                      for w in caught)
    args = argparse.Namespace(calib=None, n_windows=None, seq_len=None)
    plan_calibration(args, BitPlan({}, {}))                 # an older plan records no config: the defaults
    assert (args.calib, args.n_windows, args.seq_len) == (None, 128, 512)


def test_allocate_says_what_the_checks_decided():
    from bitalloc.cli.flow import check_lines
    from bitalloc.plan import BitPlan
    plan = BitPlan({}, {}, extra={"row_check": {"row_kl": 0.06, "layer_kl": 0.05, "windows": 8},
                                  "width_check": {"kl": 0.05, "floor_bits": 3, "windows": 8,
                                                  "without_low_widths_kl": 0.04, "chosen": "no widths below 3 bits"}})
    row, width = check_lines(plan)
    assert "row plan 0.06000 vs layer plan 0.05000: returned the layer plan" in row
    assert "the plan 0.05000 vs without low widths 0.04000: no widths below 3 bits" in width
    plan.extra["width_check"] = {"kl": 0.05, "floor_bits": 3, "windows": 8, "without_below_2_kl": 0.3,
                                 "alternatives": {"uniform Q5_K": 0.2, "llama.cpp Q3_K_S": 0.06},
                                 "early": {"without_below_2_kl": 2, "uniform Q5_K": 2}}
    _, width = check_lines(plan)
    assert ("without below 2 0.30000 (first 2 windows), uniform Q5_K 0.20000 (first 2 windows), llama.cpp Q3_K_S "
            "0.06000: kept the plan") in width


def test_apply_takes_the_plans_model_when_none_is_given(tiny_llama_dir, calib_file, tmp_path, capsys):
    """The plan records the model it was made from: `apply --plan P` without --model uses it (not the embedded
    model, which the plan's fingerprint would refuse), and says so."""
    path = tmp_path / "p.json"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "4",
                 "--out", str(path), *FAST, "--effort", "fast"]) == 0
    capsys.readouterr()
    code, _, err = run(["apply", "--plan", path, "--out", tmp_path / "packed"], capsys)
    assert code == 0, err
    assert f"model: {tiny_llama_dir}" in err and "the plan's" in err
    assert (tmp_path / "packed").exists()
