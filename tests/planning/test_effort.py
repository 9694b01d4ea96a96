"""The default path is the measured best one (issue #35): ``effort`` sets probe, quantizer, windows, check and
refine where the user leaves them out; the check scores the plan on held-out windows against the alternatives a
user would otherwise pick (uniform, llama.cpp's mix) and returns the best."""
import pytest
import torch

from bitalloc import api
from bitalloc.config import EFFORT_SETTINGS, MOE_PROBE, AllocateConfig
from bitalloc.errors import SettingError
from bitalloc.options import QuantSpec
from bitalloc.sensitivity.table import SensitivityTable
from bitalloc.units import Unit


def test_effort_fills_only_what_the_user_left_out():
    balanced = AllocateConfig(budget_bits=3.2)
    assert (balanced.effort, balanced.probe, balanced.quantizer, balanced.check) == ("balanced", "kfac", "gptq", True)
    assert balanced.n_windows == EFFORT_SETTINGS["balanced"]["n_windows"] and balanced.refine is None
    assert set(balanced.by_effort) == {"probe", "quantizer", "n_windows", "check"}
    fast = AllocateConfig(budget_bits=3.2, effort="fast")
    assert (fast.quantizer, fast.check, fast.on_model) == ("rtn", False, False)
    mine = AllocateConfig(budget_bits=3.2, probe="fisher", check=False, n_windows=4)
    assert (mine.probe, mine.check, mine.n_windows, mine.quantizer) == ("fisher", False, 4, "gptq")
    assert set(mine.by_effort) == {"quantizer"}
    best = AllocateConfig(budget_bits=3.2, effort="best", n_windows=4)
    assert best.refine == EFFORT_SETTINGS["best"]["refine"] and best.check and best.n_windows == 4
    timed = AllocateConfig(budget_bits=3.2, effort="90")
    assert timed.effort == 90.0 and timed.refine == 90.0 and timed.check
    assert "by_effort" not in balanced.to_json() and balanced.reasons()["probe"] == "effort balanced"


@pytest.mark.parametrize("bad", ["quick", -5, True])
def test_an_unknown_effort_names_the_setting(bad):
    with pytest.raises(SettingError) as e:
        AllocateConfig(budget_bits=3.2, effort=bad)
    assert e.value.field == "effort"


def test_a_moe_model_gets_a_probe_that_sees_its_experts_unless_the_user_chose():
    config = AllocateConfig(budget_bits=3.2)
    moe = config.for_model(moe=True)
    assert moe.probe == MOE_PROBE and "cannot measure MoE experts" in moe.reasons()["probe"]
    assert config.for_model(moe=False) is config
    chosen = AllocateConfig(budget_bits=3.2, probe="output_error")
    assert chosen.for_model(moe=True).probe == "output_error"      # the user's choice: the probe refuses in words


def _table(options, cost, widths=256):
    units = [Unit(f"layer{i}", (128, widths)) for i in range(len(cost))]
    return SensitivityTable(units, options, torch.tensor(cost, dtype=torch.float64), {"probe": "toy"})


def test_the_check_returns_uniform_when_it_measures_better_and_says_so():
    """A table that prefers a 2/4 split where, measured, every unit at 3 bits is better: uniform is returned."""
    from bitalloc.finish import alternatives, check_widths
    table = _table([QuantSpec(b) for b in (2, 3, 4, 8)], [[1.0, 0.9, 0.0, 0.0], [9.0, 8.9, 0.1, 0.0]] * 3)
    assert list(alternatives(table, api.solve(table, 2.7))) == ["uniform W2g128"]   # W3 takes 3.15: not at 2.7
    plan = api.solve(table, 3.3)
    assert {s.bits for s in plan.layers.values()} == {2, 4}
    others = alternatives(table, plan)
    assert list(others) == ["uniform W3g128"] and all(s.bits == 3 for s in others["uniform W3g128"].layers.values())

    def measured(choice, n_windows=None):                # mixing widths costs 10× what the table says
        return float(len(set(int(c) for c in choice)) * 10)
    assert check_widths(table, plan, measured).extra["width_check"]["chosen"] == "no widths below 3 bits"  # = W3
    low = api.solve(table, 2.7)                      # no width floor below 3 bits: uniform W2 is the alternative
    checked = check_widths(table, low, measured)
    assert checked.solver == "uniform" and checked.extra["width_check"]["chosen"] == "uniform W2g128"
    assert checked.true_bpw <= 2.7 and "uniform W2g128" in checked.extra["width_check"]["alternatives"]
    kept = check_widths(table, plan, lambda choice, n_windows=None: 0.0)     # ties keep the plan
    assert kept.layers == plan.layers and "chosen" not in kept.extra["width_check"]


def test_with_ggml_options_the_llama_cpp_mix_at_the_budget_is_an_alternative():
    from bitalloc.finish import alternatives
    from bitalloc.options import parse_options
    from bitalloc.reporting.baselines import llama_cpp_plan
    options = parse_options("ggml")
    units = [Unit(f"model.layers.{i}.{p}", (256, 512)) for i in range(4)
             for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    table = SensitivityTable(units, options, torch.rand(len(units), len(options), dtype=torch.float64),
                             {"probe": "toy"})
    q3 = llama_cpp_plan("Q3_K_M", table)
    plan = api.solve(table, q3.true_bpw + 1e-6)
    others = alternatives(table, plan)
    assert "llama.cpp Q3_K_M" in others and others["llama.cpp Q3_K_M"].layers == q3.layers
    assert all(p.true_bpw <= plan.budget_bits + 1e-9 for p in others.values())


def test_the_check_scores_on_windows_the_probe_did_not_see(tiny_llama_dir, calib_text):
    from bitalloc.finish import fitness_for
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=3, seq_len=64, held_out=2)
    assert prepared.tokens.shape == (3, 64) and prepared.held_out.shape == (2, 64)
    whole = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=5, seq_len=64).tokens
    assert torch.equal(torch.cat([prepared.tokens, prepared.held_out]), whole)
    fit = fitness_for(prepared, "gptq")
    assert fit.held_out and torch.equal(fit.workload.tokens, prepared.held_out)
    assert torch.equal(fit._gptq_workload.tokens, prepared.tokens)      # GPTQ's XᵀX from the calibration windows
    short = api.prepare(tiny_llama_dir, calibration=calib_text[:3000], n_windows=1, seq_len=64, held_out=50)
    assert short.held_out is None or len(short.held_out) < 50           # what the text has, no warning


def test_allocate_records_what_effort_chose(tmp_path, capsys):
    from bitalloc.cli import main
    out = tmp_path / "p.json"
    assert main(["allocate", "--budget", "3.5", "--effort", "fast", "--n-windows", "2", "--seq-len", "64",
                 "--out", str(out)]) == 0
    import json
    plan = json.loads(out.read_text())
    assert plan["probe"] == "kfac" and plan["extra"]["quantizer"] == "rtn"
    assert plan["extra"]["config"]["effort"] == "fast" and plan["extra"]["chosen"]["check"] == "effort fast"
    assert "effort fast chose: probe kfac, quantizer rtn, check off" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["allocate", "--budget", "3.5", "--effort", "quick", "--out", str(tmp_path / "q.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "effort 'quick'" in err[0] and not (tmp_path / "q.json").exists()
