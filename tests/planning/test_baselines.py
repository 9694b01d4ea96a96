"""llama.cpp's preset mixes as plans, the sweep that scores them beside bitalloc's plans, and the user-facing
details of #13: plan.table(), the model path as given, the fused-width export warning, chart labels."""
import csv
import json
import warnings

import pytest
import torch

from bitalloc.reporting.baselines import PRESETS, ggml_type, llama_cpp_plan, more_bits
from bitalloc.cli import main
from bitalloc.errors import BitallocWarning
from bitalloc.options import QuantSpec
from bitalloc.sensitivity.table import SensitivityTable
from bitalloc.units import Unit

PROJ = {"self_attn.q_proj": (512, 512), "self_attn.k_proj": (128, 512), "self_attn.v_proj": (128, 512),
        "self_attn.o_proj": (512, 512), "mlp.gate_proj": (1024, 512), "mlp.up_proj": (1024, 512),
        "mlp.down_proj": (512, 1024)}


def llama_table(n_layers: int = 32) -> SensitivityTable:
    units = [Unit(f"model.layers.{i}.{p}", shape, "linear") for i in range(n_layers) for p, shape in PROJ.items()]
    options = [QuantSpec(b) for b in (2, 3, 4, 8)]
    return SensitivityTable(units, options, torch.rand(len(units), len(options), dtype=torch.float64), {})


def widths(plan, proj):
    return [plan.layers[n].bits for n in plan.layers if n.endswith(proj)]


def test_more_bits_layers_of_a_32_layer_model():
    # first and last eighth (0-3, 28-31), and every third layer between starting at 4 + 2
    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_preset_rules_on_a_32_layer_llama_with_gqa_4():
    t = llama_table()
    q2, q3s, q3m, q4m = (llama_cpp_plan(p, t) for p in PRESETS)
    # Q3_K_S: q3_K everywhere
    assert {s.bits for s in q3s.layers.values()} == {3}
    # Q2_K: q2_K by default; attn_v q4_K (n_head/n_kv = 4); ffn_down and attn_output q3_K
    assert set(widths(q2, "q_proj")) == {2} and set(widths(q2, "gate_proj")) == {2}
    assert set(widths(q2, "v_proj")) == {4} and set(widths(q2, "down_proj")) == {3} and set(widths(q2, "o_proj")) == {3}
    # Q3_K_M: attn_v q5_K for two layers, then q4_K (both -> 4 in {2,3,4,8}); ffn_down q5_K/q4_K -> 4; o q4_K
    assert set(widths(q3m, "v_proj")) == {4} and set(widths(q3m, "down_proj")) == {4}
    assert set(widths(q3m, "o_proj")) == {4} and set(widths(q3m, "q_proj")) == {3}
    # Q4_K_M: q6_K (-> 8, the tie goes up) on the "more bits" layers of attn_v and ffn_down, q4_K elsewhere
    expect = [8 if more_bits(i, 32) else 4 for i in range(32)]
    assert widths(q4m, "v_proj") == expect and widths(q4m, "down_proj") == expect
    assert set(widths(q4m, "q_proj")) == {4}
    bpw = [p.true_bpw for p in (q2, q3s, q3m, q4m)]
    assert bpw == sorted(bpw) and len(set(bpw)) == 4
    assert all(p.objective == pytest.approx(sum(p.costs.values())) for p in (q2, q3s, q3m, q4m))


def test_preset_rules_with_a_wider_option_set_and_moe_and_no_gqa():
    assert ggml_type("Q2_K", "attn_v", 5, 32, n_gqa=1, n_expert=0, i_v=5) == "q3_K"
    assert ggml_type("Q3_K_M", "attn_v", 1, 32, n_gqa=1, n_expert=0, i_v=1) == "q5_K"
    assert ggml_type("Q3_K_M", "ffn_down", 1, 32, n_gqa=1, n_expert=0, i_v=0) == "q5_K"
    assert ggml_type("Q3_K_M", "ffn_down", 2, 32, n_gqa=1, n_expert=0, i_v=0) == "q4_K"
    assert ggml_type("Q3_K_S", "attn_k", 0, 32, n_gqa=4, n_expert=8, i_v=0) == "q8_0"
    assert ggml_type("Q3_K_S", "attn_output", 0, 32, n_gqa=4, n_expert=8, i_v=0) == "q5_K"
    assert ggml_type("Q4_K_M", "ffn_down_exps", 0, 32, n_gqa=4, n_expert=8, i_v=0) == "q6_K"
    t = llama_table(8)
    t.options = [QuantSpec(b) for b in (2, 3, 4, 5, 6, 8)]
    t.cost = torch.rand(len(t.units), 6, dtype=torch.float64)
    q3m = llama_cpp_plan("Q3_K_M", t)
    assert widths(q3m, "v_proj") == [5, 5, 4, 4, 4, 4, 4, 4]        # exact widths when the options have them


def test_sweep_with_llama_cpp_baselines(tiny_llama_dir, calib_file, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--seq-len", "64",
                 "--n-windows", "4", "--budgets", "2.5,3.5", "--eval", str(calib_file), "--eval-windows", "2",
                 "--baselines", "llama.cpp", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    base = {r["label"]: r for r in rows if r["kind"] == "llama.cpp"}
    assert sorted(base) == sorted(PRESETS)
    mine = {r["label"]: r for r in rows if r["kind"] == "plan" and r["label"].startswith("=")}
    for name, r in base.items():                      # a bitalloc plan at each mix's own true bits, scored beside it
        m = mine["=" + name]
        assert float(m["true_bpw"]) <= float(r["true_bpw"]) + 1e-9 and float(r["ppl"]) > 1
        assert float(r["plan_ppl_same_bits"]) == float(m["ppl"])
        assert f"llama.cpp {name} at {float(r['true_bpw']):.4f} true bpw" in printed
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_allocate_eval_scores_the_baselines(tiny_llama_dir, calib_file, tmp_path, capsys):
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--seq-len", "64",
                 "--n-windows", "4", "--budget", "3.2", "--eval", str(calib_file), "--eval-windows", "2",
                 "--baselines", "llama.cpp", "--out", str(tmp_path / "p.json")]) == 0
    printed = capsys.readouterr().out
    assert all(f"llama.cpp {p}" in printed for p in PRESETS)
    scores = json.loads((tmp_path / "p.json").read_text())["extra"]["eval"]
    assert {f"llama.cpp {p}" for p in PRESETS} <= set(scores)


def test_plan_table_keeps_costs_and_the_path_as_given(tiny_llama_dir, calib_file, tmp_path, monkeypatch, capsys):
    import os
    import shutil

    import bitalloc
    from bitalloc.plan import BitPlan
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    plan = bitalloc.allocate("m", budget_bits=3.2, calibration=calib_file.read_text(), n_windows=4, seq_len=64)
    assert plan.model["path"] == "m" and plan.model["id"] == "m" and len(plan.model["hash"]) == 24
    rows = plan.table()
    assert [r["layer"] for r in rows] == list(plan.layers)
    assert all(r["cost"] is not None and r["cost"] >= 0 for r in rows)
    assert sum(r["cost"] for r in rows) == pytest.approx(plan.objective)
    assert {r["format"] for r in rows} <= {"W2g128", "W3g128", "W4g128", "W8g128"}
    plan.save("p.json")
    again = BitPlan.load("p.json")
    assert again.costs == plan.costs and again.table() == rows
    assert os.path.abspath("m") not in open("p.json").read()


def test_gptqmodel_export_warns_when_fusable_siblings_differ():
    from bitalloc.export import to_gptqmodel
    from bitalloc.plan import BitPlan
    names = {f"model.layers.0.{p}": s for p, s in PROJ.items()}
    layers = {n: QuantSpec(4) for n in names}
    plan = BitPlan(layers=dict(layers), shapes=dict(names), budget_bits=16.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BitallocWarning)
        to_gptqmodel(plan)                                   # one width per group: silent
    layers["model.layers.0.self_attn.k_proj"] = QuantSpec(3)
    plan = BitPlan(layers=layers, shapes=dict(names), budget_bits=16.0)
    with pytest.warns(BitallocWarning, match=r"model\.layers\.0\.self_attn\.qkv.*vLLM.*--fuse"):
        to_gptqmodel(plan)


def test_dashboard_metric_is_named(tmp_path):
    """optuna-dashboard shows the study's metric names: "KL to fp", not "Objective 0"."""
    import optuna

    from bitalloc.solvers import Problem
    from bitalloc.solvers.optuna_search import OptunaSolver
    t = llama_table(2)
    url = f"sqlite:///{tmp_path / 's.db'}"
    solver = OptunaSolver(n_trials=2, study_name="named", storage=url, seed=0, space="reweight")
    solver.fitness = lambda choice, windows: float(choice.sum())
    solver.run(Problem(t, 3.5))
    assert optuna.load_study(study_name="named", storage=url).metric_names == ["KL to fp"]


def test_a_token_embedding_tied_to_the_head_takes_the_head_s_type():
    """As llama.cpp quantizes Gemma's tied token_embd: q6_K (-> 8 in {2,3,4,8}); untied, the default type."""
    t = llama_table(2)
    emb = Unit("model.embed_tokens", (8192, 4096), "embedding")
    tied = SensitivityTable([*t.units, emb], t.options, torch.rand(len(t.units) + 1, 4, dtype=torch.float64), {})
    assert llama_cpp_plan("Q3_K_M", tied).layers["model.embed_tokens"].bits == 8
    head = Unit("lm_head", (8192, 4096), "linear")
    untied = SensitivityTable([*tied.units, head], t.options, torch.rand(len(t.units) + 2, 4, dtype=torch.float64), {})
    plan = llama_cpp_plan("Q3_K_M", untied)
    assert plan.layers["model.embed_tokens"].bits == 3 and plan.layers["lm_head"].bits == 8
