"""apply / save / load of packed models, and `bitalloc apply`."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.kernels.qlinear import QuantLinear
from bitalloc.models.loading import load_model
from bitalloc.options import QuantSpec
from bitalloc import apply  # the public entry point (DESIGN.md), bitalloc.packed.apply
from bitalloc.packed import checkpoint_report, load, save
from bitalloc.plan import BitPlan
from bitalloc.quantize_model import quantize_model
from bitalloc.units import find_units


def random_plan(model, seed=0, specs=None):
    rng = random.Random(seed)
    specs = specs or [QuantSpec(2), QuantSpec(3), QuantSpec(4), QuantSpec(8), QuantSpec(3, 32, True),
                      QuantSpec(16)]
    units = find_units(model)
    return BitPlan(layers={u.name: rng.choice(specs) for u in units}, shapes={u.name: u.shape for u in units},
                   budget_bits=16.0, solver="test")


@pytest.fixture
def tokens():
    return torch.randint(0, 8192, (2, 48), generator=torch.Generator().manual_seed(1))


def test_packed_model_equals_fake_quantized(tiny_llama_dir, tokens):
    fake, _, _ = load_model(tiny_llama_dir)
    model, _, _ = load_model(tiny_llama_dir)
    plan = random_plan(model)
    quantize_model(fake, find_units(fake), plan, progress=False)
    apply(model, plan, progress=False)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n in plan.layers}
    assert "QuantLinear" in kinds
    for name, spec in plan.layers.items():
        m = model.get_submodule(name)
        assert isinstance(m, QuantLinear) == (not spec.is_float)
        if isinstance(m, QuantLinear):
            assert m.bits == spec.bits and m.group_size == spec.group_size and m.symmetric == spec.symmetric
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, fake(tokens).logits)


def test_save_load_in_a_fresh_process(tiny_llama_dir, tokens, tmp_path):
    model, tok, _ = load_model(tiny_llama_dir)
    apply(model, random_plan(model, seed=2), progress=False)
    out = save(model, tmp_path / "packed", tokenizer=tok)
    assert sorted(p.name for p in out.iterdir()) >= ["config.json", "model.safetensors", "plan.json"]
    report = checkpoint_report(model, out)
    assert abs(report["relative_diff"]) < 0.02
    with torch.no_grad():
        expected = model(tokens).logits
    torch.save(tokens, tmp_path / "tokens.pt")
    script = ("import sys, torch; from bitalloc.packed import load; m = load(sys.argv[1]); "
              "t = torch.load(sys.argv[2]); torch.save(m(t).logits.detach(), sys.argv[3])")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "tokens.pt"), str(tmp_path / "y.pt")],
                   check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_save_refuses_unpacked_and_existing(tiny_llama_dir, tmp_path):
    model, _, _ = load_model(tiny_llama_dir)
    with pytest.raises(BitallocError, match="not packed"):
        save(model, tmp_path / "x")
    apply(model, random_plan(model), progress=False)
    with pytest.raises(BitallocError, match="does not exist"):
        save(model, tmp_path / "missing" / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(BitallocError, match="not empty"):
        save(model, tmp_path / "full")
    assert not list(tmp_path.glob(".x.*"))


def _packed_dir(tiny_llama_dir, tmp_path):
    model, _, _ = load_model(tiny_llama_dir)
    apply(model, random_plan(model, seed=3, specs=[QuantSpec(3), QuantSpec(4)]), progress=False)
    return save(model, tmp_path / "packed")


def test_load_refuses_plan_that_does_not_match_tensors(tiny_llama_dir, tmp_path):
    out = _packed_dir(tiny_llama_dir, tmp_path)
    plan = json.loads((out / "plan.json").read_text())
    name, spec = next(iter(plan["layers"].items()))
    spec["bits"] = 2 if spec["bits"] != 2 else 4
    (out / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(BitallocError, match=r"does not match its plan: .*qweight"):
        load(out)


def test_load_refuses_newer_format(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    out = _packed_dir(tiny_llama_dir, tmp_path)
    tensors = load_file(out / "model.safetensors")
    save_file(tensors, out / "model.safetensors", metadata={"bitalloc_format": "2", "dtype": "float32"})
    with pytest.raises(BitallocError, match="newer than this bitalloc reads"):
        load(out)
    with pytest.raises(BitallocError, match="not a packed bitalloc checkpoint"):
        load(tmp_path)


def test_plan_width_the_packer_cannot_store():
    with pytest.raises((BitallocError, ValueError), match="7"):
        QuantLinear(64, 32, 7)


def test_cli_apply(tiny_llama_dir, calib_file, tmp_path, capsys):
    model, _, _ = load_model(tiny_llama_dir)
    random_plan(model, seed=4).save(tmp_path / "plan.json")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(calib_file.read_text()[:20000])
    args = ["apply", "--model", str(tiny_llama_dir), "--plan", str(tmp_path / "plan.json"), "--out",
            str(tmp_path / "packed"), "--calib", str(calib_file), "--seq-len", "64", "--n-windows", "4",
            "--eval", str(eval_file), "--eval-windows", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "relative difference 0.00e+00" in text
    assert main(args) == 2                                   # the folder now exists
    assert "not empty" in capsys.readouterr().err
    args[args.index("--out") + 1] = str(tmp_path / "nope" / "packed")
    assert main(args) == 2
    assert "does not exist" in capsys.readouterr().err


def test_models_load_in_their_own_dtype_and_save_unquantized_tensors_in_it(tmp_path):
    from bitalloc.models.loading import DEFAULT_MODEL
    from bitalloc.packed import _read_header
    from bitalloc.models.loading import compute_dtype
    model, _, _ = load_model(DEFAULT_MODEL)                       # refllama-s is a bf16 checkpoint
    assert model.bitalloc_source_dtype == torch.bfloat16
    # "auto": its own dtype, or fp32 on a CPU without half-precision arithmetic (test_auto_dtype_...)
    assert model.model.embed_tokens.weight.dtype == compute_dtype(torch.bfloat16, Path(DEFAULT_MODEL))
    fp32, tok, _ = load_model(DEFAULT_MODEL, dtype="fp32")
    assert fp32.model.embed_tokens.weight.dtype == torch.float32
    units = find_units(fp32)
    plan = BitPlan(layers={u.name: QuantSpec(3) for u in units}, shapes={u.name: u.shape for u in units})
    apply(fp32, plan, progress=False)
    out = save(fp32, tmp_path / "packed", tokenizer=tok)
    meta, _ = _read_header(out / "model.safetensors")
    assert meta["dtype"] == "bfloat16"
    assert fp32.model.embed_tokens.weight.dtype == torch.float32      # saving does not change the model
    report = checkpoint_report(fp32, out)
    assert abs(report["relative_diff"]) < 0.02
    rest = sum(p.numel() for n, p in fp32.named_parameters())        # unquantized parameters, in bf16
    assert report["actual_bytes"] < 1.02 * (report["true_bpw"] * report["quantized_params"] / 8 + 2 * rest + 4096)
    assert load(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_auto_dtype_widens_half_checkpoints_only_where_the_cpu_has_no_half_arithmetic(monkeypatch, tmp_path):
    from bitalloc.models import loading
    (tmp_path / "model.safetensors").write_bytes(b"0" * 1000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "fast_half_on_cpu", lambda: False)
    assert loading.compute_dtype(torch.bfloat16, tmp_path) == torch.float32          # small: fp32 is fast here
    assert loading.compute_dtype(torch.float16, tmp_path) == torch.float32
    assert loading.compute_dtype(torch.float32, tmp_path) == torch.float32
    monkeypatch.setattr(loading, "FP32_SHARE_OF_RAM", 1e-12)                          # too large for RAM in fp32
    assert loading.compute_dtype(torch.bfloat16, tmp_path) == torch.bfloat16
    monkeypatch.setattr(loading, "FP32_SHARE_OF_RAM", 0.25)
    monkeypatch.setattr(loading, "fast_half_on_cpu", lambda: True)                    # AVX512-BF16 / AMX
    assert loading.compute_dtype(torch.bfloat16, tmp_path) == torch.bfloat16
    monkeypatch.setattr(loading, "fast_half_on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)                     # the work runs on the GPU
    assert loading.compute_dtype(torch.bfloat16, tmp_path) == torch.bfloat16


def test_unknown_dtype_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:                 # argparse choices: one usage line + error, status 2
        main(["allocate", "--budget", "3", "--dtype", "int8", "--out", "x.json"])
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
