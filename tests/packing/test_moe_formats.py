"""MoE experts in the serving formats. transformers 5 keeps experts in 3-D parameters; the checkpoints hold
one Linear per expert and projection under the names transformers saves (Mixtral: block_sparse_moe.experts.N.w1,
Qwen3-MoE: mlp.experts.N.gate_proj) and GGUF holds llama.cpp's merged ffn_*_exps tensors. Each is read back by
the format's own reader (compressed-tensors' decompressor + transformers' loader, transformers' GGUF loader)
or, for GPTQ, unpacked bit by bit, to exactly the fake-quantized model."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from bitalloc.errors import BitallocError, BitallocWarning
from bitalloc.models import zoo
from bitalloc.options import QuantSpec
from bitalloc.plan import BitPlan
from bitalloc.quantize_model import quantize_model
from bitalloc.units import find_units

from ..conftest import REFLLAMA
from .test_gptq_format import _unpack_bitwise

pytestmark = pytest.mark.filterwarnings("ignore::bitalloc.errors.BitallocWarning")


def _folder(tmp_path_factory, family, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = tmp_path_factory.mktemp(family)
    zoo.tiny(family, **overrides).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFLLAMA / name, path / name)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), path


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """Rows a multiple of 256 (every K-quant fits); moe_intermediate_size 768 and norm_topk_prob as the real
    Qwen3-MoE models have them (transformers' GGUF loader and llama.cpp assume both)."""
    return _folder(tmp_path_factory, "qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=768,
                   norm_topk_prob=True)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return _folder(tmp_path_factory, "mixtral", hidden_size=128, intermediate_size=256)


def _plan(model, experts, symmetric, widths=(2, 3, 4, 8)):
    units = find_units(model, experts=experts, fuse=True)
    groups: dict[str, QuantSpec] = {}
    specs = [groups.setdefault(u.fused_group or u.name, QuantSpec(widths[len(groups) % len(widths)], 32, symmetric))
             for u in units]
    specs[next(i for i, u in enumerate(units) if u.fused_group is None)] = QuantSpec(16)   # kept in 16 bits
    return units, BitPlan.from_choice(units, specs, solver="manual")


def _fake(model, units, plan):
    fake = copy.deepcopy(model)
    quantize_model(fake, units, plan, progress=False)
    return fake


def _disk_modules(path):
    """The Linear weights save_pretrained writes for the fp model: the names a checkpoint must use."""
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k.removesuffix(".weight") for k in f.keys() if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2}


@pytest.mark.parametrize("family,symmetric,experts", [("qwen3_moe", True, "per-expert"), ("mixtral", False, "per-layer")])
def test_compressed_tensors_moe_reads_back_exactly(request, tmp_path, family, symmetric, experts):
    from bitalloc.formats.compressed_tensors import read, save
    model, tok, src = request.getfixturevalue(family)
    units, plan = _plan(model, experts, symmetric)
    save(model, plan, tmp_path / "ct", tokenizer=tok, progress=False)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    targets = {t for g in config["config_groups"].values() for t in g["targets"]}
    assert targets <= _disk_modules(src)
    expert = "block_sparse_moe.experts.3.w1" if family == "mixtral" else "mlp.experts.3.gate_proj"
    assert f"model.layers.1.{expert}" in targets
    back, how = read(tmp_path / "ct")
    assert how == "compressed-tensors decompress"
    x = torch.randint(0, 8000, (2, 32))
    with torch.no_grad():
        assert torch.equal(_fake(model, units, plan)(x).logits, back(x).logits)


def test_gptq_moe_holds_each_experts_codes_under_its_disk_name(mixtral, tmp_path):
    from bitalloc.export import gptqmodel_resolve
    from bitalloc.formats.gptq import save
    model, tok, src = mixtral
    units, plan = _plan(model, "per-expert", True)
    r = save(model, plan, tmp_path / "gq", tokenizer=tok, progress=False)
    fake = _fake(model, units, plan)
    stack = fake.model.layers[1].mlp.experts
    inter = stack.down_proj.shape[-1]
    with safe_open(str(tmp_path / "gq" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        quantized = {k.removesuffix(".qweight") for k in keys if k.endswith(".qweight")}
        assert quantized <= _disk_modules(src) and "model.layers.1.block_sparse_moe.experts.2.w3" in quantized
        for e, (leaf, want) in enumerate([("w1", stack.gate_up_proj[0, :inter]), ("w3", stack.gate_up_proj[1, inter:]),
                                          ("w2", stack.down_proj[2]), ("w1", stack.gate_up_proj[3, :inter])]):
            name = f"model.layers.1.block_sparse_moe.experts.{e}.{leaf}"
            bits = gptqmodel_resolve(r["config"], name)["bits"]
            rows_in = want.shape[1]
            codes = _unpack_bitwise(f.get_tensor(f"{name}.qweight"), bits, rows_in).T
            zeros = _unpack_bitwise(f.get_tensor(f"{name}.qzeros").T.contiguous(), bits, want.shape[0]) + 1
            g = f.get_tensor(f"{name}.g_idx").long()
            W = (codes - zeros[:, g]).float() * f.get_tensor(f"{name}.scales").float().T[:, g]
            assert torch.equal(W, want.detach())
    assert not any(".experts.gate_up_proj" in k for k in keys)


def test_gguf_moe_reads_back_through_transformers(qwen3_moe, tmp_path):
    from transformers import AutoModelForCausalLM

    from bitalloc.ggml.checkpoint import fake_quantize, save_gguf
    model, tok, _ = qwen3_moe
    units, plan = _plan(model, "per-layer", False, widths=(2, 3, 4, 5, 6, 8))
    calib = torch.randint(0, 8000, (4, 64))
    r = save_gguf(model, plan, tmp_path / "m.gguf", tokenizer=tok, calibration=calib, progress=False,
                  imatrix=tmp_path / "imatrix.gguf")
    import gguf
    entries = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "imatrix.gguf")).tensors}
    gate, up = entries["blk.1.ffn_gate_exps.weight.in_sum2"], entries["blk.1.ffn_up_exps.weight.in_sum2"]
    counts = entries["blk.1.ffn_gate_exps.weight.counts"].data.reshape(-1)
    assert [int(n) for n in gate.shape] == [256, 4] and np.array_equal(gate.data, up.data)
    assert counts.sum() == 2 * calib.numel()                    # each token reaches 2 of the 4 experts
    assert [int(n) for n in entries["blk.1.ffn_down_exps.weight.in_sum2"].shape] == [768, 4]
    h = r["importance"]["model.layers.1.mlp.experts.gate_up_proj"]
    assert h.shape == (4, 256) and np.allclose(gate.data / counts[:, None], h.numpy(), rtol=1e-5)
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert tensors["blk.0.ffn_gate_exps.weight"].tensor_type.name == r["units"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert [int(n) for n in tensors["blk.0.ffn_down_exps.weight"].shape] == [768, 256, 4]
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    fake = copy.deepcopy(model)
    fake_quantize(fake, r["units"], r["importance"])
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (fake(calib[:2]).logits - back(calib[:2]).logits).abs().max() < 1e-5


def test_gguf_gives_an_expert_stack_one_type(qwen3_moe, tmp_path):
    from bitalloc.ggml.plan_types import plan_types
    model, _, _ = qwen3_moe
    units, plan = _plan(model, "per-expert", True)
    with pytest.warns(BitallocWarning, match="stack's widest type"):
        types = plan_types(plan, units)
    stack = [types[u.name] for u in units if u.module_name == "model.layers.0.mlp.experts" and u.param == "down_proj"]
    assert len(stack) == 4 and len(set(stack)) == 1
    with pytest.raises(BitallocError, match="--experts per-layer"):
        plan_types(plan, units, exact=True)


def test_a_qwen3_moe_gguf_needs_renormalised_experts(tmp_path):
    from bitalloc.ggml.checkpoint import save_gguf
    from transformers import AutoTokenizer
    model = zoo.tiny("qwen3_moe", norm_topk_prob=False)
    units, plan = _plan(model, "per-layer", True)
    with pytest.raises(BitallocError, match="norm_topk_prob"):
        save_gguf(model, plan, tmp_path / "m.gguf", tokenizer=AutoTokenizer.from_pretrained(REFLLAMA), progress=False)
    assert not (tmp_path / "m.gguf").exists()
