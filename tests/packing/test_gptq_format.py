"""apply --format gptq: AutoGPTQ's layout (qweight/qzeros/scales/g_idx, v1 zero points for symmetric plans,
gptq_v2 for asymmetric ones) holding bitalloc's own codes. GPTQModel's own reader is checked where it is
installed (it pulls a CUDA build of torch, so not in CI; see the #22 note for its figures)."""
import importlib.util
import json

import pytest
import torch

from bitalloc import api
from bitalloc.cli import main
from bitalloc.formats.gptq import pack_layer, pack_stream
from bitalloc.options import QuantSpec, parse_options
from bitalloc.quantize import rtn

FAST = ["--n-windows", "4", "--seq-len", "64"]


def _unpack_bitwise(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The layout read bit by bit: code k of a run of 32 sits at bits bits·k … bits·k + bits − 1 of the run's
    32·bits-bit little-endian stream (AutoGPTQ's 3-bit layout spills codes 10 and 21 across words)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    runs = w.reshape(n // 32, bits, -1)
    out = torch.zeros(n // 32, 32, runs.shape[-1], dtype=torch.int64)
    for k in range(32):
        for b in range(bits):
            pos = bits * k + b
            out[:, k] |= ((runs[:, pos // 32] >> (pos % 32)) & 1) << b
    return out.reshape(n, -1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_bit_stream_holds_each_code_where_autogptq_reads_it(bits):
    codes = torch.randint(0, 2**bits, (64, 5))
    words = pack_stream(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 5)
    assert torch.equal(_unpack_bitwise(words, bits, 64), codes)
    if bits == 3:                               # AutoGPTQ: code 10's two low bits end word 0, its top bit starts word 1
        w0, w1 = int(words[0, 0]) & 0xFFFFFFFF, int(words[1, 0]) & 0xFFFFFFFF
        assert (w0 >> 30) | ((w1 & 1) << 2) == int(codes[10, 0])


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_layer_unpacks_to_our_dequantized_weight(symmetric):
    W = torch.randn(64, 256)
    spec = QuantSpec(3, 128, symmetric)
    q = rtn(W, spec)
    if not symmetric:
        q.zeros.clamp_(min=1)                   # v1 cannot hold a zero of 0 (refused separately)
    t = pack_layer(q, spec, v1=True)
    codes = _unpack_bitwise(t["qweight"], 3, 256).T                    # (out, in)
    zeros = _unpack_bitwise(t["qzeros"].T.contiguous(), 3, 64) + 1      # (out, G), v1: stored minus one
    g = t["g_idx"].long()
    W_hat = (codes - zeros[:, g]).float() * t["scales"].float().T[:, g]
    assert torch.equal(W_hat, q.dequantize())
    assert t["scales"].dtype == torch.float16 and torch.equal(g, torch.arange(256) // 128)


def test_a_zero_point_of_zero_is_refused_in_v1():
    from bitalloc.errors import BitallocError
    W = torch.rand(32, 128)                     # all positive: zero points of 0
    spec = QuantSpec(4, 128, False)
    with pytest.raises(BitallocError, match="zero point of 0"):
        pack_layer(rtn(W, spec), spec, v1=True)
    assert pack_layer(rtn(W, spec), spec, v1=False)["qzeros"].shape == (1, 4)


@pytest.mark.slow
def test_apply_writes_a_gptq_folder_with_dynamic_widths(k_llama_dir, calib_file, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["allocate", "--model", str(k_llama_dir), "--calib", str(calib_file), "--budget", "3.6",
                 "--symmetric", "--fuse", "--out", str(plan), *FAST]) == 0
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--calib", str(calib_file), "--plan", str(plan),
                 "--format", "gptq", "--out", str(tmp_path / "gq"), *FAST]) == 0
    assert "as gptq (gptq)" in capsys.readouterr().out
    config = json.loads((tmp_path / "gq" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq" and config["sym"] is True
    from bitalloc.export import gptqmodel_resolve
    from bitalloc.plan import BitPlan
    p = BitPlan.load(plan)
    for name, spec in p.layers.items():
        assert gptqmodel_resolve(config, name)["bits"] == spec.bits
    from safetensors import safe_open
    with safe_open(str(tmp_path / "gq" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = next(iter(p.layers))
    assert {f"{name}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx")} <= keys and f"{name}.weight" not in keys


def test_plans_gptq_cannot_hold_are_refused_in_one_line(k_llama_dir, calib_file, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["allocate", "--model", str(k_llama_dir), "--calib", str(calib_file), "--budget", "3.3",
                 "--out", str(plan), *FAST]) == 0               # no --fuse: q/k/v widths differ
    capsys.readouterr()
    assert main(["apply", "--model", str(k_llama_dir), "--plan", str(plan), "--format", "gptq",
                 "--out", str(tmp_path / "gq"), *FAST]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fuse" in err[0] and not (tmp_path / "gq").exists()


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None, reason="GPTQModel is not installed")
def test_gptqmodel_reads_our_weights(k_llama_dir, tmp_path):
    from gptqmodel import BACKEND, GPTQModel

    from bitalloc.formats.gptq import save
    from bitalloc.quantize_model import quantize_model
    p = api.prepare(str(k_llama_dir), n_windows=4, seq_len=64, options=parse_options("2,3,4,8", symmetric=True),
                    dtype="fp16")
    plan = api.solve(api.measure(p, "fisher", cache=False), 3.6, "ilp", fuse=True)
    save(p.model, plan, tmp_path / "gq", tokenizer=p.tokenizer, progress=False)
    quantize_model(p.model, p.units, plan, progress=False)
    m = GPTQModel.load(str(tmp_path / "gq"), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    for u in p.units:
        assert torch.equal(m.model.get_submodule(u.name).dequantize_weight().T, p.model.get_submodule(u.name).weight)
