"""Issue #20, items 9–10 and what a new user found: crafted files, bounded reads, checks before the model loads."""
import json
import shutil
import time

import pytest
import torch
from bitalloc import api
from bitalloc.cli import main
from bitalloc.errors import BitallocError

FAST = ["--seq-len", "32", "--n-windows", "2"]


@pytest.fixture(scope="module")
def checkpoint(tiny_llama_dir, tmp_path_factory, calib_text):
    d = tmp_path_factory.mktemp("ck")
    (d / "calib.txt").write_text(calib_text)
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(d / "calib.txt"), "--budget", "3.5",
                 "--out", str(d / "plan.json"), *FAST]) == 0
    assert main(["apply", "--model", str(tiny_llama_dir), "--plan", str(d / "plan.json"), "--out", str(d / "ck"),
                 *FAST]) == 0
    return d


def _with_header(src, dst, header_len: int | None = None, meta: dict | None = None):
    """A copy of checkpoint folder ``src`` whose safetensors header claims ``header_len`` bytes, or whose
    metadata is ``meta``."""
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if meta is not None:
        header["__metadata__"] = meta
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        data = len(blob).to_bytes(8, "little") + blob + data[8 + n:]
    if header_len is not None:
        data = header_len.to_bytes(8, "little") + data[8:]
    path.write_bytes(data)
    return dst


def test_a_crafted_header_length_is_one_line_not_a_memory_error(checkpoint, tmp_path):
    """Item 9: an 8-byte header length of 2⁶² was read by hand: MemoryError."""
    from bitalloc.packed import load
    bad = _with_header(checkpoint / "ck", tmp_path / "bad", header_len=2 ** 62)
    with pytest.raises(BitallocError, match="not a readable safetensors file"):
        load(bad)


def test_the_dtype_in_the_header_is_allow_listed(checkpoint, tmp_path):
    """Item 9: the header's dtype string went to getattr(torch, …) ("nn", "load", anything)."""
    from bitalloc.packed import load
    bad = _with_header(checkpoint / "ck", tmp_path / "bad", meta={"bitalloc_format": "1", "dtype": "load"})
    with pytest.raises(BitallocError, match="names dtype 'load'"):
        load(bad)
    assert load(checkpoint / "ck").bitalloc_plan.true_bpw > 3


def test_the_heat_map_of_a_crafted_plan_stays_small(tmp_path):
    """Item 10: the grid was rows × cols float64 of whatever the names said (a 2 MB plan -> 7 GB)."""
    from bitalloc.options import QuantSpec
    from bitalloc.plan import BitPlan
    from bitalloc.reporting import plots
    names = [f"m.{i}.p{i}" for i in range(3000)]                # 3000 distinct rows and 3000 distinct columns
    plan = BitPlan({n: QuantSpec(4, 128, False) for n in names}, {n: (8, 128) for n in names})
    import numpy as np
    seen, real = [], np.full
    try:
        np.full = lambda shape, *a, **k: seen.append(shape) or real(shape, *a, **k)
        t0 = time.time()
        plots.bits_heatmap(plan, tmp_path / "h.png")
    finally:
        np.full = real
    assert seen and seen[0][0] <= plots.MAX_HEAT_ROWS and seen[0][1] <= plots.MAX_HEAT_COLS
    assert (tmp_path / "h.png").stat().st_size > 0 and time.time() - t0 < 60


def test_plots_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Item 10: pareto.png was written in place: a failure left half a PNG."""
    import matplotlib.figure
    from bitalloc.reporting import plots

    def fails(self, path, **k):
        open(path, "wb").write(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fails)
    rows = [{"true_bpw": 3.0, "ppl": 10.0, "label": "3"}]
    with pytest.raises(OSError):
        plots.pareto_plot(rows, rows, tmp_path / "pareto.png", fp=9.0)
    assert list(tmp_path.iterdir()) == []


def test_a_few_windows_do_not_tokenize_the_whole_calibration_file(tiny_llama_dir, tmp_path, calib_text, monkeypatch):
    """Item 10: the calibration file was read and tokenized whole even for 2 × 64 tokens."""
    big = tmp_path / "big.txt"
    big.write_text(calib_text * 40)                                 # ~2.4 MB
    import transformers
    lengths = []
    real = transformers.PreTrainedTokenizerFast.__call__
    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "__call__",
                        lambda self, text, *a, **k: lengths.append(len(text)) or real(self, text, *a, **k))
    prepared = api.prepare(tiny_llama_dir, calib_file=big, seq_len=64, n_windows=2)
    whole = api.prepare(tiny_llama_dir, calibration=calib_text * 40, seq_len=64, n_windows=2)
    assert max(lengths[:2]) < 100_000 < big.stat().st_size
    assert torch.equal(prepared.tokens, whole.tokens)             # the same windows as tokenizing it all


def test_the_torchrun_path_validates_a_cache_hit(tiny_llama_dir, calib_text, monkeypatch):
    """Item 10: under torchrun a cached entry was used without the checks measure() makes."""
    from bitalloc import table_cache
    from bitalloc.models import distributed
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, seq_len=32, n_windows=2)
    called = []
    monkeypatch.setattr(table_cache, "lookup", lambda *a, **k: called.append(a) or None)

    class OneRank:
        def get_rank(self):
            return 0

        def get_world_size(self):
            return 1

        def broadcast_object_list(self, obj, src=0):
            pass

        def all_reduce(self, t):
            pass
    import torch.distributed as dist
    for name in ("get_rank", "get_world_size", "broadcast_object_list", "all_reduce"):
        monkeypatch.setattr(dist, name, getattr(OneRank(), name))
    monkeypatch.setattr(distributed, "check_agreement", lambda *a, **k: None)
    table = distributed.measure_distributed(prepared, "fisher", {}, cache=True)
    assert called and table.cost.shape[0] == len(prepared.units)


@pytest.mark.parametrize("case", ["no tokenizer", "utf-16", "infeasible"])
def test_cheap_mistakes_are_refused_before_the_model_loads(case, tiny_llama_dir, tmp_path, calib_file, monkeypatch,
                                                           capsys):
    """A folder without tokenizer files ("is a weight file truncated?"), a UTF-16 file and an infeasible budget
    were refused only after the model loaded (20–25 s on a real model)."""
    import bitalloc.models.loading as loading
    model, calib, budget = tiny_llama_dir, calib_file, "3.2"
    if case == "no tokenizer":
        model = tmp_path / "m"
        shutil.copytree(tiny_llama_dir, model)
        for f in model.glob("tokenizer*"):
            f.unlink()
    elif case == "utf-16":
        calib = tmp_path / "u16.txt"
        calib.write_text("some calibration text " * 200, encoding="utf-16")
    else:
        budget = "1.5"
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr("bitalloc.api.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["allocate", "--model", str(model), "--calib", str(calib), "--budget", budget, "--out",
                 str(tmp_path / "p.json"), *FAST]) == 2
    err = capsys.readouterr().err
    assert {"no tokenizer": "has no tokenizer", "utf-16": "UTF-16", "infeasible": "infeasible"}[case] in err
    assert not (tmp_path / "p.json").exists()


def test_a_budget_above_the_widest_option_says_what_the_plan_is(tiny_llama_dir, calib_file, tmp_path, capsys):
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "16", "--out",
                 str(tmp_path / "p.json"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "more than the widest option needs: the plan is all W8g128 at 8." in err


def test_the_pareto_plot_keeps_w8_out_and_marks_equal_bits_plans(tmp_path, monkeypatch):
    """A new user: W8 squeezed the 2–5 bpw range; `=Q3_K_M` plans looked like ordinary ones; Q3_K_S / Q3_K_M
    labels overlapped."""
    from bitalloc.reporting import plots
    seen = {}
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: seen.setdefault("ax", fig.axes[0]) and
                        real(plt, fig, path))
    uniform = [{"label": f"W{b}g128", "true_bpw": b + 0.15, "ppl": 20.0 / b} for b in (2, 3, 4, 8)]
    plans = [{"label": "3", "true_bpw": 3.0, "ppl": 7.0}, {"label": "3.5", "true_bpw": 3.5, "ppl": 6.0},
             {"label": "=Q3_K_M", "true_bpw": 3.53, "ppl": 5.9}]
    mixes = [{"label": "Q3_K_S", "true_bpw": 3.44, "ppl": 6.5}, {"label": "Q3_K_M", "true_bpw": 3.53, "ppl": 6.4}]
    plots.pareto_plot(plans, uniform, tmp_path / "p.png", fp=5.0, baselines=mixes)
    ax = seen["ax"]
    xs = [x for line in ax.get_lines() for x in line.get_xdata() if line.get_linestyle() != "-" or
          line.get_marker() != "None"]
    assert max(xs) <= plots.ZOOM_BPW and any("W8g128" in t.get_text() for t in ax.texts)
    assert any(line.get_marker() == "D" and list(line.get_xdata()) == [3.53] for line in ax.get_lines())
    offsets = {t.get_text(): t.xyann for t in ax.texts if t.get_text().startswith("Q3")}
    assert offsets["Q3_K_S"] != offsets["Q3_K_M"]
