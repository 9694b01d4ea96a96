"""apply --format compressed-tensors: bitalloc's own codes in the package's pack-quantized layout, read back
by the package (transformers' from_pretrained for symmetric schemes, its decompressor for asymmetric ones) to
exactly the fake-quantized model's logits."""
import copy
import json
import warnings

import pytest
import torch

from bitalloc import api
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.options import QuantSpec, parse_options
from bitalloc.plan import BitPlan
from bitalloc.quantize_model import quantize_model

ct = pytest.importorskip("compressed_tensors")
FAST = ["--n-windows", "4", "--seq-len", "64"]


@pytest.fixture(scope="module")
def prepared(k_llama_dir):
    return api.prepare(str(k_llama_dir), n_windows=4, seq_len=64)


def _plan(prepared, symmetric):
    units = prepared.units
    specs = [QuantSpec((2, 3, 4, 8)[i % 4], 128, symmetric) for i in range(len(units))]
    specs[1] = QuantSpec(16)                                     # a layer the plan keeps in 16 bits
    return BitPlan.from_choice(units, specs, solver="manual", model=prepared.info)


@pytest.mark.parametrize("symmetric,reader", [(True, "transformers from_pretrained"),
                                              (False, "compressed-tensors decompress")])
@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_the_package_reads_back_our_codes(prepared, tmp_path, symmetric, reader, quantizer):
    from bitalloc.formats.compressed_tensors import read, save
    plan = _plan(prepared, symmetric)
    model = prepared.model
    before = {n: p.clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = save(model, plan, tmp_path / "ct", tokenizer=prepared.tokenizer, quantizer=quantizer,
                 calibration=prepared.tokens, progress=False)
    # transformers cannot load zero points: said for the asymmetric plan (the fix named), not the symmetric one
    said = [str(w.message) for w in caught if "zero points" in str(w.message)]
    assert len(said) == (0 if symmetric else 1) and all("--target transformers" in m for m in said)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())      # the caller's model is intact
    fake = copy.deepcopy(model)
    quantize_model(fake, prepared.units, plan, quantizer=quantizer, calibration=prepared.tokens, progress=False)
    back, how = read(tmp_path / "ct")
    assert how == reader
    x = prepared.tokens[:2]
    with torch.no_grad():
        assert torch.equal(fake.float()(x).logits, back(x).logits)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and len(config["config_groups"]) == 4
    assert prepared.units[1].name in config["ignore"]
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.removesuffix(".weight") not in plan.layers or plan.layers[n.removesuffix(".weight")].is_float)
    assert abs(r["bytes"] / (plan.size_bytes() + rest) - 1) < 0.02


def test_row_plans_round_up_or_are_refused(prepared):
    from bitalloc.formats.compressed_tensors import storable_specs
    layers = _plan(prepared, False)
    name = prepared.units[0].name
    rows = torch.full((prepared.units[0].shape[0],), layers.layers[name].bits, dtype=torch.int8)
    rows[0] = 4
    plan = BitPlan(dict(layers.layers), dict(layers.shapes), layers.budget_bits, row_bits={name: rows})
    with pytest.raises(BitallocError, match="one scheme"):
        storable_specs(plan, prepared.units, exact=True)
    with pytest.warns(UserWarning, match="widest row"):
        assert storable_specs(plan, prepared.units, exact=False)[name].bits == 4


def test_unstorable_plans_are_refused_in_one_line(tiny_llama_dir, k_llama_dir, calib_file, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["allocate", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--budget", "3.5",
                 "--out", str(plan), *FAST]) == 0          # 64-wide rows: a 128 group does not divide them
    capsys.readouterr()
    assert main(["apply", "--model", str(tiny_llama_dir), "--plan", str(plan), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct"), *FAST]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a multiple of its group size" in err[0] and not (tmp_path / "ct").exists()
    ggml = tmp_path / "ggml.json"
    assert main(["allocate", "--model", str(k_llama_dir), "--calib", str(calib_file), "--budget", "4",
                 "--options", "ggml", "--out", str(ggml), *FAST]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--plan", str(ggml), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct"), *FAST]) != 0
    assert "--format gguf" in capsys.readouterr().err and not (tmp_path / "ct").exists()
    assert parse_options("ggml")[0].ggml == "Q2_K"


def test_python_apply_writes_each_format_and_leaves_the_model_as_it_is(prepared, tmp_path):
    """bitalloc.apply(model, plan, format=…, out=…): the same writers as `apply --format`, tokenizer found from
    the folder the model was loaded from; bad calls refused in one line before anything is written."""
    import bitalloc
    from bitalloc.formats.compressed_tensors import read
    plan = _plan(prepared, True)
    model = prepared.model
    before = {n: p.clone() for n, p in model.named_parameters()}
    r = bitalloc.apply(model, plan, format="compressed-tensors", out=tmp_path / "ct", progress=False)
    assert r["format"] == "compressed-tensors" and r["path"] == str(tmp_path / "ct")
    assert (tmp_path / "ct" / "tokenizer_config.json").exists()           # from model.bitalloc_folder
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    fake = copy.deepcopy(model)
    quantize_model(fake, prepared.units, plan, quantizer="rtn", progress=False)
    back, _ = read(tmp_path / "ct")
    x = prepared.tokens[:2]
    with torch.no_grad():
        assert torch.equal(fake.float()(x).logits, back(x).logits)
    w4 = BitPlan.from_choice(prepared.units, [QuantSpec(4, 128, True)] * len(prepared.units), solver="uniform",
                             model=prepared.info)                # vLLM's fused groups share one format
    r = bitalloc.apply(model, w4, format="gptq", out=tmp_path / "gptq", progress=False)
    assert r["config"]["quant_method"] == "gptq" and (tmp_path / "gptq" / "model.safetensors").exists()
    r = bitalloc.apply(model, plan, format="gguf", out=tmp_path / "m.gguf", progress=False)
    assert r["path"].endswith("m.gguf") and sum(r["types"].values()) == len(plan.layers)
    with pytest.raises(BitallocError, match="pass out="):
        bitalloc.apply(model, plan, format="gptq")
    with pytest.raises(BitallocError, match="unknown format 'awq'"):
        bitalloc.apply(model, plan, format="awq", out=tmp_path / "awq")
    assert not (tmp_path / "awq").exists()
    packed = bitalloc.apply(copy.deepcopy(model), plan, out=tmp_path / "packed", progress=False)
    assert packed.bitalloc_plan.layers == plan.layers and (tmp_path / "packed" / "plan.json").exists()


def test_a_missing_compressed_tensors_package_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """`apply --format compressed-tensors` without the package: one line naming the pip install, before the model
    loads (it used to quantize for 52 s, then fail); the Python writer refuses before quantizing too."""
    import importlib.util

    import bitalloc
    from bitalloc.cli import main
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors"
                        else real(name, *a))
    code = main(["apply", "--plan", str(tmp_path / "never-read.json"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "ct")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install compressed-tensors" in err[0], err
    assert not (tmp_path / "ct").exists()
    with pytest.raises(bitalloc.BitallocError, match="pip install compressed-tensors"):
        bitalloc.apply(torch.nn.Sequential(torch.nn.Linear(64, 64)), bitalloc.BitPlan({}, {}), format="compressed-tensors",
                       out=tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()
