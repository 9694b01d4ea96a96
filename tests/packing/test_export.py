"""Exports to other tools' configs, sweep, plots and the report."""
import json

import pytest

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.export import gguf_name, gptqmodel_resolve, to_compressed_tensors, to_gptqmodel, to_llama_cpp
from bitalloc.options import QuantSpec
from bitalloc.plan import BitPlan

PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]


def llama_plan(n_layers=8, seed=0, specs=None):
    import random
    rng = random.Random(seed)
    specs = specs or [QuantSpec(2), QuantSpec(3), QuantSpec(4), QuantSpec(8), QuantSpec(3, 64), QuantSpec(4, 32, True),
                      QuantSpec(16)]
    names = [f"model.layers.{i}.{p}" for i in range(n_layers) for p in PROJ]
    return BitPlan(layers={n: rng.choice(specs) for n in names}, shapes={n: (384, 384) for n in names},
                   budget_bits=16.0, solver="test")


@pytest.mark.parametrize("seed", range(5))
def test_gptqmodel_first_match_gives_back_every_width(seed):
    plan = llama_plan(seed=seed)
    config = json.loads(json.dumps(to_gptqmodel(plan)))
    assert all(k.startswith(("+:^", "-:^")) for k in config["dynamic"])
    for name, spec in plan.layers.items():
        got = gptqmodel_resolve(config, name)
        if spec.is_float:
            assert got is None
        else:
            assert got == {"bits": spec.bits, "group_size": spec.group_size, "sym": spec.symmetric}, name
    # a prefix of a layer name must not catch a longer one (layers.1 vs layers.10)
    plan = llama_plan(n_layers=12, seed=seed)
    config = to_gptqmodel(plan)
    for name, spec in plan.layers.items():
        assert gptqmodel_resolve(config, name) == (None if spec.is_float else
                                                   {"bits": spec.bits, "group_size": spec.group_size,
                                                    "sym": spec.symmetric})


def test_gptqmodel_maps_unsupported_widths_up_with_a_warning():
    plan = llama_plan(n_layers=1, specs=[QuantSpec(5)])
    with pytest.warns(UserWarning, match=r"mapped up 7 layer\(s\).*5->8.*true bpw becomes"):
        config = to_gptqmodel(plan)
    assert config["bits"] == 8


def test_compressed_tensors_validates_with_its_own_model():
    ct = pytest.importorskip("compressed_tensors.quantization")
    plan = llama_plan(seed=1)
    data = to_compressed_tensors(plan)
    config = ct.QuantizationConfig.model_validate(data)
    seen = {}
    for group in config.config_groups.values():
        for target in group.targets:
            seen[target] = group.weights
    for name, spec in plan.layers.items():
        if spec.is_float:
            assert name in config.ignore
        else:
            w = seen[name]
            assert (w.num_bits, w.group_size, w.symmetric) == (spec.bits, spec.group_size, spec.symmetric)


def test_llama_cpp_maps_every_layer_of_refllama():
    from bitalloc.models.loading import DEFAULT_MODEL, load_model
    from bitalloc.units import find_units
    model, _, _ = load_model(DEFAULT_MODEL)
    units = find_units(model, include=("lm_head",))
    plan = BitPlan(layers={u.name: QuantSpec(4) for u in units}, shapes={u.name: u.shape for u in units},
                   budget_bits=16.0, solver="t")
    text = to_llama_cpp(plan)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(lines) == len(units) == 57
    assert "blk\\.7\\.ffn_down\\.weight=q4_K" in lines and "output\\.weight=q4_K" in lines
    assert all(gguf_name(u.name) for u in units)


def test_unmappable_names_and_unknown_format(tmp_path, capsys):
    plan = BitPlan(layers={"encoder.block.0.dense": QuantSpec(4)}, shapes={"encoder.block.0.dense": (64, 64)},
                   budget_bits=16.0, solver="t")
    with pytest.raises(BitallocError, match=r"no GGUF tensor name \(encoder.block.0.dense\)"):
        to_llama_cpp(plan)
    plan.save(tmp_path / "p.json")
    assert main(["export", str(tmp_path / "p.json"), "--to", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "choose one of gptqmodel, llama.cpp, compressed-tensors" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "p.json"), "--to", "gptqmodel", "--out", str(tmp_path / "no" / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["export", str(tmp_path / "p.json"), "--to", "compressed-tensors", "--out",
                 str(tmp_path / "ct.json")]) == 0
    assert "quantization_config" in json.loads((tmp_path / "ct.json").read_text())


def test_uniform_curve_is_piecewise_linear_between_uniform_plans():
    from bitalloc.cli import uniform_curve_at
    uniform = [{"true_bpw": 4.0, "ppl": 12.0}, {"true_bpw": 2.0, "ppl": 24.0}, {"true_bpw": 3.0, "ppl": 13.0}]
    assert uniform_curve_at(uniform, 2.5) == pytest.approx(18.5)
    assert uniform_curve_at(uniform, 3.25) == pytest.approx(12.75)
    assert uniform_curve_at(uniform, 3.0) == pytest.approx(13.0)
    assert uniform_curve_at(uniform, 1.9) is None and uniform_curve_at(uniform, 4.1) is None


def test_sweep_and_report(tiny_llama_dir, calib_file, tmp_path, capsys):
    args = ["sweep", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--seq-len", "64", "--n-windows",
            "4", "--budgets", "2.5:4.5:1", "--eval", str(calib_file), "--eval-windows", "2",
            "--out-dir", str(tmp_path / "sw")]
    assert main(args) == 0
    import csv
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    plans = [r for r in rows if r["kind"] == "plan"]
    assert [float(r["budget"]) for r in plans] == [2.5, 3.5, 4.5]
    assert all(float(r["true_bpw"]) <= float(r["budget"]) + 1e-9 and float(r["ppl"]) > 0 for r in plans)
    assert "plans inside the uniform range are at or below the uniform curve" in capsys.readouterr().out
    assert (tmp_path / "sw" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # a search solver gets its KL fitness on the model, as in allocate
    assert main([*args[:-1], str(tmp_path / "sw_optuna"), "--solver", "optuna", "--generations", "3"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "sw_optuna" / "sweep.csv")))
    assert [float(r["budget"]) for r in rows if r["kind"] == "plan"] == [2.5, 3.5, 4.5]
    assert main(["sweep", "--budgets", "4:2:1", "--out-dir", str(tmp_path / "s2")]) == 2
    assert "START:STOP:STEP" in capsys.readouterr().err

    plan = llama_plan(n_layers=2)
    plan.save(tmp_path / "p.json")
    assert main(["report", str(tmp_path / "p.json"), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "model.layers.1.mlp.down_proj" in page

    assert main(["report", str(tmp_path / "p.json"), "--out", str(tmp_path / "r.md")]) == 0
    page = (tmp_path / "r.md").read_text()
    assert "![bits](r.bits.png)" in page and (tmp_path / "r.bits.png").read_bytes()[:4] == b"\x89PNG"
    layer_lines = [line for line in page.splitlines() if line.startswith("| model.layers.")]
    assert len(layer_lines) == len(plan.layers) and all(line.count(" | ") == 3 for line in layer_lines)
    before = set(tmp_path.iterdir())
    assert main(["report", str(tmp_path / "p.json"), "--out", str(tmp_path / "missing" / "r.md")]) == 2
    assert set(tmp_path.iterdir()) == before


def _moe_plan(experts: str, seed: int = 0):
    import random

    from bitalloc.models import zoo
    from bitalloc.units import find_units
    rng = random.Random(seed)
    units = find_units(zoo.tiny("qwen2_moe"), experts=experts)
    return BitPlan(layers={u.name: QuantSpec(rng.choice([2, 3, 4, 8])) for u in units},
                   shapes={u.name: u.shape for u in units}, budget_bits=4.0, solver="test")


@pytest.mark.parametrize("experts", ["per-expert", "per-layer"])
def test_moe_exports_name_every_expert(experts):
    plan = _moe_plan(experts)
    config = json.loads(json.dumps(to_gptqmodel(plan)))
    for e in range(4):                          # GPTQModel's per-expert Linear names, fused gate_up split
        for proj, unit in (("gate_proj", "gate_up_proj"), ("up_proj", "gate_up_proj"), ("down_proj", "down_proj")):
            name = (f"model.layers.1.mlp.experts.{e}.{unit}" if experts == "per-expert"
                    else f"model.layers.1.mlp.experts.{unit}")
            got = gptqmodel_resolve(config, f"model.layers.1.mlp.experts.{e}.{proj}")
            assert got["bits"] == plan.layers[name].bits
    ct = pytest.importorskip("compressed_tensors.quantization")
    validated = ct.QuantizationConfig.model_validate(to_compressed_tensors(plan))
    targets = [t for g in validated.config_groups.values() for t in g.targets]
    assert ("model.layers.0.mlp.experts.3.up_proj" in targets) == (experts == "per-expert")
    assert any(t.startswith("re:") for t in targets) == (experts == "per-layer")


def test_llama_cpp_merges_experts_into_one_type_per_stack():
    per_layer = to_llama_cpp(_moe_plan("per-layer"))
    assert "blk\\.0\\.ffn_down_exps\\.weight=" in per_layer and "blk\\.1\\.ffn_up_shexp\\.weight=" in per_layer
    plan = _moe_plan("per-expert")
    with pytest.warns(UserWarning, match="stores the experts of a layer in one tensor"):
        text = to_llama_cpp(plan)
    widest = max(plan.layers[f"model.layers.0.mlp.experts.{e}.gate_up_proj"].bits for e in range(4))
    types = dict(line.split("=") for line in text.splitlines() if not line.startswith("#"))
    assert types["blk\\.0\\.ffn_gate_exps\\.weight"] == types["blk\\.0\\.ffn_up_exps\\.weight"] == \
        {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0"}[widest]


def test_cli_prints_the_expert_merge_warning_as_one_line(tmp_path, capsys):
    from bitalloc.cli import main
    plan = _moe_plan("per-expert", seed=3)
    plan.budget_bits = 16.0
    plan.save(tmp_path / "plan.json")
    assert main(["export", str(tmp_path / "plan.json"), "--to", "llama.cpp", "--out", str(tmp_path / "t.txt")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bitalloc: warning: llama.cpp stores the experts of a layer")
