"""A zoo of model families built locally from transformers config classes, random weights, no downloads.

``tiny(family)`` gives a few-million-parameter model of that family's architecture (what the tests run);
``LLAMA_3_1_8B``, ``LLAMA_3_1_70B`` and ``MIXTRAL_8X7B`` hold the public config values of Llama-3.1-8B/70B and
Mixtral-8x7B for memory and time benchmarks at real width (examples/bench_scale.py cuts them to a few layers).
Random weights: right for memory, time and coverage, not for quality.
"""
from __future__ import annotations

import torch

# Public Llama-3.1-8B config values (hidden 4096, MLP 14336, 32 heads / 8 KV heads, vocab 128256).
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)

# Public Llama-3.1-70B config values (hidden 8192, MLP 28672, 80 layers, 64 heads / 8 KV heads, vocab 128256).
LLAMA_3_1_70B = dict(LLAMA_3_1_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8)

# Public Mixtral-8x7B config values (hidden 4096, expert MLP 14336, 8 experts / 2 per token, 32 heads / 8 KV heads,
# vocab 32000).
MIXTRAL_8X7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                    num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
                    tie_word_embeddings=False)

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# family -> (config class name, causal-LM class name, config keywords)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(_SMALL, rope_theta=500000.0)),
    "qwen2.5": ("Qwen2Config", "Qwen2ForCausalLM", dict(_SMALL)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_SMALL, head_dim=16)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_SMALL)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_SMALL, head_dim=16, sliding_window=32)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_SMALL, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=2, hidden_size=64, ffn_dim=128,
                                                num_attention_heads=4, word_embed_proj_dim=64,
                                                max_position_embeddings=256)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_SMALL, **_MOE)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_SMALL, head_dim=16, num_experts=4,
                                                                num_experts_per_tok=2, moe_intermediate_size=32,
                                                                decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(_SMALL, num_experts=4, num_experts_per_tok=2,
                                                                moe_intermediate_size=32,
                                                                shared_expert_intermediate_size=64,
                                                                decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_SMALL, num_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(_SMALL, head_dim=16, num_local_experts=4,
                                                          num_experts_per_tok=2, sliding_window=32,
                                                          layer_types=["sliding_attention", "full_attention"])),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "gpt_oss")


def config(family: str, vocab_size: int = 8192, **overrides):
    import transformers
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    config_cls, _, kwargs = FAMILIES[family]
    return getattr(transformers, config_cls)(vocab_size=vocab_size, **{**kwargs, **overrides})


def tiny(family: str, *, vocab_size: int = 8192, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised causal LM of ``family`` (a key of FAMILIES), in eval mode."""
    import transformers
    torch.manual_seed(seed)
    cfg = config(family, vocab_size, **overrides)
    model = randomize_experts(getattr(transformers, FAMILIES[family][1])(cfg).eval())
    return model.to(dtype)


def randomize_experts(model):
    """Some families initialise their 3-D expert tensors with zeros or leave them empty: make those (and any
    non-finite parameter) random, in place."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3 or not torch.isfinite(p).all():
                p.normal_(0, 0.02)
    return model
