"""Per-row plans end to end: plan JSON v2, row costs, row solvers, per-row quantizers, the mixed packed layer,
exports and the CLI."""
import json
import warnings

import pytest
import torch

from bitalloc.errors import BitallocError, BitallocWarning
from bitalloc.kernels.pack import mixed_size_bits, packed_size_bits, row_tag_bits
from bitalloc.options import QuantSpec
from bitalloc.plan import BitPlan
from bitalloc.sensitivity.table import SensitivityTable
from bitalloc.units import Unit

OPTS = [QuantSpec(b) for b in (2, 3, 4, 8)]


def row_table(seed=0, shapes=((256, 512), (128, 512), (256, 256), (96, 384)), names=None, kinds=None):
    g = torch.Generator().manual_seed(seed)
    names = names or [f"model.layers.{i}.mlp.proj{i}" for i in range(len(shapes))]
    kinds = kinds or ["linear"] * len(shapes)
    units = [Unit(n, s, k) for n, s, k in zip(names, shapes, kinds)]
    R = sum(s[0] for s in shapes)
    scale = torch.rand(R, 1, generator=g, dtype=torch.float64) ** 3 * 10
    rows = scale * torch.tensor([[16.0, 4.0, 1.0, 0.004]], dtype=torch.float64) * \
        torch.exp(0.2 * torch.randn(R, 4, generator=g, dtype=torch.float64))
    off, cost = 0, []
    for s in shapes:
        cost.append(rows[off:off + s[0]].sum(0))
        off += s[0]
    return SensitivityTable(units, OPTS, torch.stack(cost), {"probe": "fisher"}, rows)


# -- plan JSON v2 ----------------------------------------------------------------------------------------------
def test_row_plan_json_round_trip_and_exact_size():
    rb = torch.tensor([2, 3, 3, 4] * 16 + [8] * 3, dtype=torch.int8)
    plan = BitPlan(layers={"a": QuantSpec(3), "b": QuantSpec(4)}, shapes={"a": (67, 300), "b": (64, 256)},
                   row_bits={"a": rb}, budget_bits=4.0)
    data = json.loads(json.dumps(plan.to_json()))
    assert data["version"] == 2 and "bits" not in data["layers"]["a"]
    assert data["layers"]["a"]["row_bits"] == "".join(str(int(b)) for b in rb)
    back = BitPlan.from_json(data)
    assert torch.equal(back.row_bits["a"], rb) and back.layers["a"].bits == 8
    expect = sum(packed_size_bits(n, 300, b, 128, False) for b, n in ((2, 16), (3, 32), (4, 16), (8, 3)))
    expect += row_tag_bits(67) + QuantSpec(4).size_bits((64, 256))
    assert back.true_bpw * back.n_params == pytest.approx(expect)
    assert back.nominal_bpw * back.n_params == pytest.approx(int(rb.long().sum()) * 300 + 4 * 64 * 256)
    assert back.bits_histogram() == {2: 16 * 300, 3: 32 * 300, 4: 16 * 300 + 64 * 256, 8: 3 * 300}


def test_v1_plans_still_load():
    data = {"format": "bitalloc.plan", "version": 1, "layers": {"a": {"bits": 3, "group_size": 128,
                                                                      "symmetric": False, "shape": [8, 128]}}}
    assert BitPlan.from_json(data).layers["a"] == QuantSpec(3)


@pytest.mark.parametrize("row_bits,match", [("333", "3 digits for 4 rows"), ("33a3", "string of digits"),
                                            ("3373", "7-bit weights cannot be stored"), ("3313", r"width\(s\) \[1\]"),
                                            (3333, "string of digits")])
def test_bad_row_bits_name_the_layer(row_bits, match):
    data = {"format": "bitalloc.plan", "version": 2, "layers": {"model.x": {
        "row_bits": row_bits, "group_size": 128, "symmetric": False, "shape": [4, 128]}}}
    with pytest.raises(BitallocError, match=match) as e:
        BitPlan.from_json(data)
    assert "model.x" in str(e.value) and "\n" not in str(e.value)
    data["layers"]["model.x"]["bits"] = 3
    data["layers"]["model.x"]["row_bits"] = "3333"
    with pytest.raises(BitallocError, match="both"):
        BitPlan.from_json(data)


def test_one_width_in_every_row_is_an_ordinary_layer():
    plan = BitPlan(layers={"a": QuantSpec(8)}, shapes={"a": (4, 128)}, row_bits={"a": torch.full((4,), 3)})
    assert plan.row_bits == {} and plan.layers["a"] == QuantSpec(3)


# -- solvers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [2.4, 2.75, 3.25, 4.0])
def test_row_plans_are_never_worse_than_layer_plans_and_fit(seed, budget):
    from bitalloc.api import solve
    table = row_table(seed)
    layer = solve(table, budget, "ilp")
    for solver in ("closed_form", "greedy", "ilp"):
        plan = solve(table, budget, solver, granularity="row")
        assert plan.true_bpw <= budget + 1e-12
        assert plan.objective <= layer.objective * (1 + 1e-12)
        assert plan.extra["gap_to_lp_bound"] >= -1e-9
        costs = sum(float(table.rows_of(i)[torch.arange(u.shape[0]), _option_index(plan, u.name)].sum())
                    for i, u in enumerate(table.units))
        assert costs == pytest.approx(plan.objective)


def _option_index(plan, name):
    bits = plan.row_bits.get(name)
    if bits is None:
        bits = torch.full((plan.shapes[name][0],), plan.layers[name].bits)
    return torch.tensor([[2, 3, 4, 8].index(int(b)) for b in bits])


@pytest.mark.parametrize("shapes", [((256, 512), (128, 512), (256, 256), (96, 384)), ((4096, 256),) * 12])
def test_closed_form_and_its_greedy_twin_agree(shapes):
    """Same rule, two implementations; the large case has tens of thousands of rows, where an item taking
    several hull steps at once once lost all but a random one of them."""
    from bitalloc.api import solve
    for seed in range(2):
        table = row_table(seed + 10, shapes=shapes)
        a = solve(table, 3.0, "closed_form", granularity="row")
        b = solve(table, 3.0, "greedy", granularity="row")
        assert a.objective == pytest.approx(b.objective, rel=1e-9)
        assert a.true_bpw == pytest.approx(b.true_bpw, rel=1e-12) and a.true_bpw > 2.99


def test_row_granularity_beats_layers_when_rows_differ():
    from bitalloc.api import solve
    table = row_table(3)
    assert solve(table, 3.0, "closed_form", granularity="row").objective < 0.9 * solve(table, 3.0, "ilp").objective


def test_fused_groups_and_experts_keep_one_width_per_layer():
    from bitalloc.api import solve
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
             "model.layers.0.mlp.experts.1.down_proj"]
    table = row_table(1, shapes=((128, 256), (64, 256), (64, 256), (256, 128)), names=names,
                      kinds=["linear", "linear", "linear", "expert"])
    import dataclasses
    table.units = [dataclasses.replace(u, fused_group="model.layers.0.self_attn.qkv") if k < 3 else u
                   for k, u in enumerate(table.units)]
    plan = solve(table, 3.0, "closed_form", granularity="row", fuse=True)
    assert not set(plan.row_bits) & set(names)
    assert len({plan.layers[n] for n in names[:3]}) == 1


def test_row_granularity_refuses_mixed_group_sizes_and_tables_without_rows():
    from bitalloc.api import solve
    t = row_table(0)
    t2 = SensitivityTable(t.units, [QuantSpec(2), QuantSpec(3, 64), QuantSpec(4), QuantSpec(8)], t.cost, t.meta,
                          t.row_cost)
    with pytest.raises(BitallocError, match="one group size"):
        solve(t2, 3.0, "closed_form", granularity="row")
    with pytest.raises(BitallocError, match="no row costs"):
        solve(SensitivityTable(t.units, t.options, t.cost, t.meta), 3.0, "closed_form", granularity="row")


# -- quantizers and packing ---------------------------------------------------------------------------------------
def test_rtn_and_gptq_per_row():
    from bitalloc.quantize import CLIP_GRID, fake_quantize, fake_quantize_rows, gptq, rtn, rtn_rows
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 256, generator=g)
    rb = torch.tensor([2, 3, 4, 8] * 10, dtype=torch.int8)
    q = rtn_rows(W, QuantSpec(4), rb)
    for b in (2, 3, 4, 8):
        r = rb == b
        assert torch.equal(q.parts[b].codes, rtn(W[r], QuantSpec(b)).codes)
        assert torch.equal(q.dequantize()[r], fake_quantize(W[r], QuantSpec(b), grid=(1.0,)))
    assert torch.equal(fake_quantize_rows(W, QuantSpec(8), rb, grid=(1.0,)), q.dequantize())
    clipped = rtn_rows(W, QuantSpec(4), rb, grid=CLIP_GRID)       # --quantizer rtn's default: the same per row
    assert torch.equal(fake_quantize_rows(W, QuantSpec(8), rb), clipped.dequantize())
    X = torch.randn(512, 256, generator=g)
    H = X.T @ X
    same = gptq(W, H, QuantSpec(3), row_bits=torch.full((40,), 3, dtype=torch.int8))
    plain = gptq(W, H, QuantSpec(3))
    assert torch.equal(same.parts[3].codes, plain.codes) and torch.equal(same.parts[3].scales, plain.scales)
    mixed = gptq(W, H, QuantSpec(8), row_bits=rb)
    for b, part in mixed.parts.items():
        assert int(part.codes.max()) <= 2**b - 1 and part.codes.shape[0] == int((rb == b).sum())
    err = ((mixed.dequantize() - W) @ X.T).pow(2).sum(1)
    rtn_err = ((q.dequantize() - W) @ X.T).pow(2).sum(1)
    assert float(err.sum()) < float(rtn_err.sum())           # GPTQ's per-row grid still beats RTN


def test_mixed_quant_linear_matches_its_dequantized_weight():
    from bitalloc.kernels.qmixed import MixedQuantLinear, pack_tags, unpack_tags
    from bitalloc.quantize import rtn_rows
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 33, 70):
        rb = torch.randint(0, 4, (n,), generator=g)
        rb = torch.tensor([2, 3, 4, 8])[rb].to(torch.int8)
        assert torch.equal(unpack_tags(pack_tags(rb), n), rb)
        W = torch.randn(n, 200, generator=g)
        q = rtn_rows(W, QuantSpec(8), rb)
        bias = torch.randn(n, generator=g)
        m = MixedQuantLinear.from_quantized(q, bias)
        x = torch.randn(3, 200, generator=g)
        assert torch.equal(m.dequantized(), q.dequantize())
        assert torch.allclose(m(x), x @ q.dequantize().T + bias, atol=1e-5)
        if len(set(rb.tolist())) > 1:
            assert m.packed_bytes() * 8 == mixed_size_bits(rb, 200, 128, False)


def test_packed_row_plan_reproduces_the_fake_quantized_model(tiny_llama_dir, calib_file, tmp_path):
    import bitalloc
    from bitalloc.api import measure, prepare, solve
    from bitalloc.packed import checkpoint_report, load, planned_units, save
    from bitalloc.quantize_model import quantize_model
    p = prepare(str(tiny_llama_dir), calibration=calib_file.read_text(), n_windows=4, seq_len=64)
    table = measure(p, "fisher", cache=False)
    assert table.row_cost.shape == (sum(u.shape[0] for u in p.units), 4)
    for i in range(len(p.units)):                         # a unit's cost is the sum of its rows'
        assert torch.allclose(table.rows_of(i).sum(0), table.cost[i], rtol=1e-9)
    plan = solve(table, 3.0, "closed_form", granularity="row")
    assert plan.row_bits
    import copy
    for quantizer in ("rtn", "gptq"):
        fake = copy.deepcopy(p.model)
        quantize_model(fake, planned_units(fake, plan), plan, quantizer=quantizer, calibration=p.tokens,
                       sink=lambda n, q: None)
        model = bitalloc.apply(copy.deepcopy(p.model), plan, quantizer=quantizer, calibration=p.tokens,
                               progress=False)
        save(model, tmp_path / quantizer, p.tokenizer)
        report = checkpoint_report(model, tmp_path / quantizer)
        assert abs(report["relative_diff"]) < 0.02
        back = load(tmp_path / quantizer)
        with torch.no_grad():
            ref = fake(p.tokens[:2]).logits
            assert torch.equal(model(p.tokens[:2]).logits, ref)
            assert torch.equal(back(p.tokens[:2]).logits, ref)


def test_streamed_fisher_gives_the_same_row_costs(tiny_llama_dir, calib_file):
    from bitalloc.api import prepare
    from bitalloc.sensitivity import get_probe
    p = prepare(str(tiny_llama_dir), calibration=calib_file.read_text(), n_windows=4, seq_len=64)
    whole = get_probe("fisher", stream="off").measure(p.workload, p.units, p.options)
    streamed = get_probe("fisher", stream="on").measure(p.workload, p.units, p.options)
    assert torch.allclose(whole.row_cost, streamed.row_cost, rtol=1e-4, atol=1e-12)


# -- exports, CLI, report ------------------------------------------------------------------------------------------
def test_exports_round_row_plans_up_or_refuse():
    from bitalloc.export import export
    rb = torch.tensor([2, 3] * 64, dtype=torch.int8)
    plan = BitPlan(layers={"model.layers.0.mlp.down_proj": QuantSpec(3)},
                   shapes={"model.layers.0.mlp.down_proj": (128, 256)}, row_bits={"model.layers.0.mlp.down_proj": rb})
    for fmt in ("gptqmodel", "llama.cpp", "compressed-tensors"):
        with pytest.warns(BitallocWarning, match="rounded up to their widest row.*true bpw becomes"):
            text = export(plan, fmt)
        assert "3" in text
        with pytest.raises(BitallocError, match="cannot express"):
            export(plan, fmt, exact=True)


def test_cli_row_granularity(tiny_llama_dir, calib_file, tmp_path, capsys):
    from bitalloc.cli import main
    fast = ["--model", str(tiny_llama_dir), "--calib", str(calib_file), "--seq-len", "64", "--n-windows", "4"]
    assert main(["allocate", *fast, "--budget", "3.0", "--granularity", "row", "--out", str(tmp_path / "c.json")]) == 0
    checked = json.loads((tmp_path / "c.json").read_text())
    err = capsys.readouterr().err
    if checked["version"] == 2:              # the row plan scored no worse than the layer plan on calibration windows
        assert checked["solver"] == "closed_form" and checked["extra"]["row_check"]["row_kl"] <= \
            checked["extra"]["row_check"]["layer_kl"]
    else:                                    # it scored worse: the layer plan, and a warning that says so
        assert checked["extra"]["fallback"] and "row plan scores worse" in err
    assert checked["true_bpw"] <= 3.0
    from bitalloc import api
    prepared = api.prepare(tiny_llama_dir, calib_file=calib_file, seq_len=64, n_windows=4)
    api.solve(api.measure(prepared, "fisher"), 3.0, "closed_form", granularity="row").save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["version"] == 2 and any("row_bits" in v for v in data["layers"].values())
    assert main(["allocate", *fast, "--budget", "3.0", "--granularity", "row", "--probe", "hessian_trace",
                 "--out", str(tmp_path / "q.json")]) == 2
    assert "no per-row costs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "p.json"), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.rows.png").read_bytes()[:4] == b"\x89PNG"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(tmp_path / "p.json"), "--to", "gptqmodel", "--exact",
                     "--out", str(tmp_path / "g.json")]) == 2
    assert not (tmp_path / "g.json").exists()
