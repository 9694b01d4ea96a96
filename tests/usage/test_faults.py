"""Fault injection (issue #20): SIGTERM and SIGKILL at points of allocate and apply, a full disk, a read-only
cache and HOME. After each: no partial output, no traceback, one message line, no stale temporary folder after
the next run, and that run's result identical to an undisturbed one.

A full or read-only file system is a real tmpfs where this machine lets us mount one (root, as in CI), else a
patched writer."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bitalloc.cli import main
from bitalloc.plan import BitPlan

FAST = ["--seq-len", "32", "--n-windows", "2"]


def _mount(path: Path, *opts: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (skip where mounting is not allowed)."""
    path = tmp_path / "small"
    if not _mount(path, "size=256k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", "-l", str(path)])


@pytest.fixture
def read_only_fs(tmp_path):
    path = tmp_path / "ro"
    if not _mount(path, "ro", "size=64k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", "-l", str(path)])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".bitalloc-" in p.name) if folder.is_dir() else []


def _one_line_error(err: str) -> bool:
    lines = [s for s in err.splitlines() if s.startswith("bitalloc: error:")]
    return len(lines) == 1 and "Traceback" not in err


@pytest.fixture(scope="module")
def undisturbed(tiny_llama_dir, tmp_path_factory, calib_text):
    """The plan and checkpoint of runs nothing interrupts."""
    d = tmp_path_factory.mktemp("undisturbed")
    (d / "calib.txt").write_text(calib_text)
    env = os.environ.get("BITALLOC_CACHE")
    os.environ["BITALLOC_CACHE"] = str(d / "cache")
    try:
        assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(d / "calib.txt"), "--budget", "3.5",
                     "--out", str(d / "plan.json"), *FAST]) == 0
        assert main(["apply", "--model", str(tiny_llama_dir), "--plan", str(d / "plan.json"), "--out", str(d / "ck"),
                     "--calib", str(d / "calib.txt"), *FAST]) == 0
    finally:
        os.environ["BITALLOC_CACHE"] = env or ""
    return d


def test_a_read_only_cache_or_home_only_warns(tiny_llama_dir, undisturbed, read_only_fs, tmp_path, monkeypatch,
                                              capsys):
    for where in ("cache", "home"):
        if where == "cache":
            monkeypatch.setenv("BITALLOC_CACHE", str(read_only_fs / "cache"))
        else:
            monkeypatch.delenv("BITALLOC_CACHE")
            monkeypatch.setenv("HOME", str(read_only_fs))
        out = tmp_path / f"plan-{where}.json"
        assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(undisturbed / "calib.txt"),
                     "--budget", "3.5", "--out", str(out), *FAST]) == 0
        err = capsys.readouterr().err
        assert "could not cache the table" in err and "read-only" in err and "Traceback" not in err
        assert json.loads(out.read_text())["layers"] == json.loads((undisturbed / "plan.json").read_text())["layers"]


def test_apply_into_a_read_only_folder_fails_before_the_work(tiny_llama_dir, undisturbed, read_only_fs, monkeypatch,
                                                           capsys):
    """Item 7: `apply` found out that --out was not writable only after quantizing everything."""
    import bitalloc.quantize_model
    monkeypatch.setattr(bitalloc.quantize_model, "quantize_model", lambda *a, **k: pytest.fail("quantized first"))
    assert main(["apply", "--model", str(tiny_llama_dir), "--plan", str(undisturbed / "plan.json"), "--out",
                 str(read_only_fs / "ck"), *FAST]) == 2
    err = capsys.readouterr().err
    assert _one_line_error(err) and "read-only" in err


def test_a_full_disk_is_refused_before_the_work_and_during_the_save(tiny_llama_dir, undisturbed, small_fs,
                                                                    monkeypatch, capsys):
    args = ["apply", "--model", str(tiny_llama_dir), "--plan", str(undisturbed / "plan.json"), "--out",
            str(small_fs / "ck"), "--calib", str(undisturbed / "calib.txt"), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert _one_line_error(err) and "free" in err and "needs about" in err
    import bitalloc.files
    monkeypatch.setattr(bitalloc.files, "check_space", lambda *a, **k: None)     # as if the estimate were wrong
    assert main(args) == 2
    err = capsys.readouterr().err
    assert _one_line_error(err) and "no space left on the device" in err and "needs" in err
    assert list(small_fs.iterdir()) == []                              # no checkpoint, no temporary folder


DRIVER = """
import sys, time, pathlib
marker, when = pathlib.Path(sys.argv[1]), sys.argv[2]
import safetensors.torch as st
real = st.save_model
def slow_save(*a, **k):
    real(*a, **k)
    if when == "save":
        marker.write_text("saving")
        time.sleep(120)
st.save_model = slow_save
from bitalloc.cli import main
if when == "start":
    marker.write_text("started")
sys.exit(main(sys.argv[3:]))
"""


def _run_and_signal(args: list[str], sig: int, when: str, tmp_path: Path, delay: float = 0.0):
    marker = tmp_path / f"marker-{sig}-{when}"
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(marker), when, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not marker.exists() and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _same_checkpoint(a: Path, b: Path) -> bool:
    """Every tensor and the metadata equal (safetensors writes its metadata map in a random order)."""
    import torch
    from safetensors import safe_open
    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        return fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys()) and \
            all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_apply_leaves_nothing_and_the_next_run_is_the_same(sig, tiny_llama_dir, undisturbed, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "ck"
    args = ["apply", "--model", str(tiny_llama_dir), "--plan", str(undisturbed / "plan.json"), "--out", str(out),
            "--calib", str(undisturbed / "calib.txt"), *FAST]
    code, err = _run_and_signal(args, sig, "save", tmp_path)
    assert code == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert not out.exists()
    if sig == signal.SIGTERM:
        assert "terminated" in err and "Traceback" not in err and _leftovers(tmp_path) == []
    else:
        assert len(_leftovers(tmp_path)) == 1                   # what SIGKILL cannot clean up: the next run does
    assert main(args) == 0
    err = capsys.readouterr().err
    assert _leftovers(tmp_path) == []
    if sig == signal.SIGKILL:
        assert "removed 1 unfinished temporary file(s)" in err
    assert _same_checkpoint(out, undisturbed / "ck")


@pytest.mark.slow
def test_allocate_killed_at_random_points_gives_the_undisturbed_plan(tiny_llama_dir, undisturbed, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    rng = random.Random(20)
    out = tmp_path / "plan.json"
    args = ["allocate", "--model", str(tiny_llama_dir), "--calib", str(undisturbed / "calib.txt"), "--budget", "3.5",
            "--out", str(out), *FAST]
    for k in range(3):
        sig = (signal.SIGTERM, signal.SIGKILL)[k % 2]
        code, err = _run_and_signal(args, sig, "start", tmp_path, delay=rng.uniform(0.2, 4.0))
        assert "Traceback" not in err
        if out.exists():                          # written before the signal came: whole, and the same plan
            assert json.loads(out.read_text())["layers"] == json.loads((undisturbed / "plan.json").read_text())["layers"]
            out.unlink()
    assert main(args) == 0
    assert json.loads(out.read_text())["layers"] == json.loads((undisturbed / "plan.json").read_text())["layers"]
    for folder in (tmp_path, tmp_path / "cache" / "tables"):
        assert _leftovers(folder) == []


def test_a_killed_sweep_goes_on_from_the_rows_it_wrote(tiny_llama_dir, undisturbed, tmp_path, monkeypatch, capsys):
    """Killed at budget 4 of 9, sweep left nothing; now it writes each row as scored and resumes from them."""
    from bitalloc import evaluate
    text = tmp_path / "eval.txt"
    text.write_text((undisturbed / "calib.txt").read_text()[-20000:])
    args = ["sweep", "--model", str(tiny_llama_dir), "--calib", str(undisturbed / "calib.txt"), "--budgets",
            "3:4:0.5", "--eval", str(text), "--eval-windows", "2", "--out-dir", str(tmp_path / "s"), *FAST]
    assert main([*args[:-len(FAST) - 2], "--out-dir", str(tmp_path / "whole"), *FAST]) == 0
    whole = (tmp_path / "whole" / "sweep.csv").read_text()
    real, calls = evaluate.Evaluator.score_plan, []

    def dies_on_the_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(evaluate.Evaluator, "score_plan", dies_on_the_third)
    assert main(args) == 130
    import csv
    partial = list(csv.DictReader((tmp_path / "s" / "sweep.csv").open()))
    assert len(partial) == len(whole.splitlines()) - 1 and sum(bool(r["ppl"]) for r in partial) == 2
    monkeypatch.setattr(evaluate.Evaluator, "score_plan", real)
    capsys.readouterr()
    assert main(args) == 0
    assert "2 of" in capsys.readouterr().out
    assert (tmp_path / "s" / "sweep.csv").read_text() == whole


@pytest.mark.slow
def test_a_terminated_search_writes_no_plan_and_the_study_goes_on(tiny_llama_dir, undisturbed, tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    url = f"sqlite:///{tmp_path / 's.db'}"
    args = ["search", "--model", str(tiny_llama_dir), "--calib", str(undisturbed / "calib.txt"), "--study", "t",
            "--storage", url, "--budget", "3.5", "--n-trials", "6", "--windows", "1", "--trial-delay", "1",
            "--out", str(tmp_path / "best.json"), *FAST]
    code, err = _run_and_signal(args, signal.SIGTERM, "start", tmp_path, delay=6.0)
    assert code == 143 and "Traceback" not in err and not (tmp_path / "best.json").exists()
    assert main(args) == 0
    import optuna
    study = optuna.load_study(study_name="t", storage=url)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 6
    assert BitPlan.load(tmp_path / "best.json").true_bpw <= 3.5


def test_optuna_logs_an_interrupted_trial_without_a_traceback():
    """Optuna logs a trial ended by SIGTERM/Ctrl-C with its traceback (seen in CI when the signal landed inside
    a trial): the line stays, the traceback goes."""
    script = ("import optuna, bitalloc.solvers.optuna_search\n"
              "from bitalloc.cli import Terminated\n"
              "def f(t):\n    t.suggest_float('x', 0, 1)\n    raise Terminated()\n"
              "try:\n    optuna.create_study().optimize(f, n_trials=1)\nexcept KeyboardInterrupt:\n    print('stopped')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "stopped"
    assert "Trial 0 failed" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
