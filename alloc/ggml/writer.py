"""A complete llama.cpp checkpoint: ``apply --format gguf`` writes the model, its metadata and tokenizer
through the ``gguf`` package's writer, every planned weight in a ggml type quantized by our own quantizers
(ggml/types.py, weighted by the calibration's input energy), everything else in F16 (norms in F32).

Metadata: a model read from a GGUF file keeps that file's metadata and tokenizer (only the file type
changes); a Hugging Face model of a supported architecture (ARCHS) gets llama.cpp's keys from its config and
its tokenizer from tokenizer.json (ggml/vocab.py). Tensors are named by the package's own name map and laid out
as llama.cpp's converter lays them (llama: q/k rows permuted for its rope; gemma: norms stored as 1 + w).
MoE experts (transformers 5 keeps them in 3-D parameters) are written as llama.cpp's merged
``ffn_{gate,up,down}_exps`` tensors (E × rows × cols, one ggml type for all experts of a projection; the
fused ``gate_up_proj`` is cut into its gate and up halves), routers as F32 ``ffn_gate_inp``.
Tensors are quantized and written one at a time: the file never sits in memory whole.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..errors import BitallocError
from ..files import atomic_path
from . import layout
from .types import TYPES, quantize
from .vocab import write_tokenizer

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")   # from a Hugging Face config; any architecture from a GGUF file
GGUF_ARCH = {"qwen3_moe": "qwen3moe"}        # llama.cpp's name where it differs from transformers' model_type
PERMUTED = ("llama",)                        # llama.cpp's rope wants q/k rows interleaved per head
PLUS_ONE_NORMS = ("gemma", "gemma2", "gemma3")
SKIP_KEYS = ("GGUF.", "general.file_type", "general.quantization_version", "split.")


def write(model: nn.Module, tokenizer, types: dict[str, str], out: str | os.PathLike, *,
          importance: dict[str, torch.Tensor] | None = None, progress: bool = True,
          packed: dict[str, np.ndarray] | None = None) -> int:
    """Write ``model`` with each unit of ``types`` ({module name: ggml type}) quantized to the GGUF ``out``;
    ``packed``: units already quantized ({name: layout.pack's blocks}, e.g. by GPTQ), written as they are.
    Returns the bytes of its tensor data (the file adds the metadata and tokenizer)."""
    with atomic_path(out) as tmp:
        w, tensors, arch = _start(model, tokenizer, types, tmp)
        for name, tensor, shape, type_name, unit in tqdm(tensors, desc="write gguf", leave=False, disable=not progress):
            w.write_tensor_data(_data(tensor, type_name, unit, importance, model.config, arch, name, packed))
        w.close()
    return sum(nbytes(shape, type_name) for _, _, shape, type_name, _ in tensors)


def file_bytes(model: nn.Module, tokenizer, types: dict[str, str]) -> int:
    """The exact size of the file ``write`` makes with ``types``, without quantizing anything: its header,
    metadata and tensor table (written to a scratch file), then each tensor's data padded to the alignment."""
    import tempfile
    from gguf import GGUFWriter
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "header.gguf"
        w, tensors, _ = _start(model, tokenizer, types, path)
        w.close()
        head, align = path.stat().st_size, w.data_alignment
    return GGUFWriter.ggml_pad(head, align) + sum(GGUFWriter.ggml_pad(nbytes(shape, t), align)
                                                  for _, _, shape, t, _ in tensors)


def _start(model, tokenizer, types, path):
    """A GGUF writer at ``path`` with the metadata, tokenizer and tensor table written; (writer, tensors, arch)."""
    import gguf
    source = _source_gguf(model)
    arch = _arch(model, source)
    names = tensor_names(model)
    tensors = _tensor_list(model, types, names, arch)
    w = gguf.GGUFWriter(str(path), arch)
    if source is not None:
        _copy_metadata(w, source)
    else:
        _hf_metadata(w, model.config, arch)
        write_tokenizer(w, tokenizer, model.config.vocab_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(_file_type(types))
    for name, _, shape, type_name, _ in tensors:
        qtype = getattr(gguf.GGMLQuantizationType, type_name)
        w.add_tensor_info(name, shape, np.float32 if type_name == "F32" else np.float16, nbytes(shape, type_name),
                          raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w, tensors, arch


def tensor_names(model: nn.Module):
    """The ``gguf`` package's name map from this model's parameter names to its GGUF tensor names."""
    import gguf
    arch = _arch(model, _source_gguf(model))
    n_blocks = getattr(model.config, "num_hidden_layers", 0)
    return gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), n_blocks)


def _source_gguf(model: nn.Module) -> Path | None:
    from ..models.gguf import is_gguf
    path = getattr(model, "bitalloc_given_path", None) or getattr(model, "name_or_path", None)
    return Path(path) if path and is_gguf(path) else None


def _arch(model: nn.Module, source: Path | None) -> str:
    if source is not None:
        from .reader import value
        return str(value(source, "general.architecture"))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise BitallocError(f"GGUF output is written for {', '.join(ARCHS)} models from a Hugging Face folder (this "
                            f"one is {model_type!r}) or for any model read from a .gguf file: use --format bitalloc")
    if model_type == "qwen3_moe" and not getattr(model.config, "norm_topk_prob", True):
        raise BitallocError("llama.cpp's qwen3moe always renormalises the chosen experts' weights; this model has "
                            "norm_topk_prob false, which a GGUF file cannot say: use --format bitalloc")
    return GGUF_ARCH.get(model_type, model_type)


def _tensor_list(model, types, names, arch):
    """(gguf name, tensor, numpy shape (rows, cols), type name, unit name or None) of every tensor to write."""
    from ..formats.disk import state_tensors
    out, missing = [], []
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for hf_name, t in state_tensors(model).items():  # a head tied to the embeddings: llama.cpp reuses token_embd
        if t.dim() == 3:                              # a stack of MoE experts
            parts = expert_parts(hf_name, t)
            type_name = stack_type(types, hf_name)
            for part_name, part in parts:
                name = names.get_name(part_name + ".weight", try_suffixes=(".weight",))
                if name is None:
                    missing.append(hf_name)
                    break
                out.append((name, part, tuple(part.shape), type_name, hf_name))   # its importance: per expert
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            if hf_name not in params:
                continue                              # a buffer (rotary frequencies): not a weight of the file
            missing.append(hf_name)
            continue
        unit = hf_name.removesuffix(".weight") if hf_name.endswith(".weight") else None
        if unit in types:
            type_name = types[unit]
        else:
            type_name = "F32" if keeps_f32(hf_name, t, modules) else "F16"
        out.append((name, t, tuple(t.shape), type_name, unit if unit in types else None))
    if missing:
        raise BitallocError(f"{len(missing)} tensor(s) have no llama.cpp name for architecture {arch!r} "
                            f"({', '.join(missing[:3])}): this model cannot be written as GGUF; use --format bitalloc")
    return out


def keeps_f32(hf_name: str, t: torch.Tensor, modules: dict) -> bool:
    """An unplanned tensor llama.cpp keeps in F32: 1-D ones (norms, biases) and MoE routers."""
    from ..units import _is_router
    owner = hf_name.removesuffix(".weight")
    return t.dim() == 1 or (owner in modules and _is_router(owner, modules))


def expert_part_names(hf_name: str) -> list[str]:
    """The Hugging Face names the package maps to llama.cpp's tensors of a 3-D expert parameter:
    ``experts.gate_up_proj`` is ``experts.gate_proj`` (its first half of rows) and ``experts.up_proj``."""
    if hf_name.endswith("experts.gate_up_proj"):
        stem = hf_name.removesuffix("gate_up_proj")
        return [stem + "gate_proj", stem + "up_proj"]
    return [hf_name]


def expert_parts(hf_name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of each llama.cpp tensor of the 3-D expert parameter ``t`` (``expert_part_names``)."""
    names = expert_part_names(hf_name)
    return list(zip(names, t.chunk(len(names), dim=1)))


def stack_type(types: dict[str, str], param: str) -> str:
    """The ggml type of a 3-D expert parameter: its per-layer unit's, else its experts' (one per stack:
    plan_types rounds experts of a stack up to the widest), else F16."""
    if param in types:
        return types[param]
    owner, _, leaf = param.rpartition(".")
    return types.get(f"{owner}.0.{leaf}", "F16")


def nbytes(shape, type_name: str) -> int:
    """Bytes a tensor of ``shape`` takes in the ggml type (or F16/F32)."""
    n = int(np.prod(shape))
    if type_name in ("F32", "F16"):
        return n * (4 if type_name == "F32" else 2)
    t = TYPES[type_name]
    return n // t.block * t.block_bytes


def _data(t: torch.Tensor, type_name: str, unit, importance, config, arch: str, name: str,
          packed: dict | None = None) -> np.ndarray:
    if packed is not None and unit in packed:
        t = torch.from_numpy(packed[unit])               # rows of blocks, in the weight's own row order
    else:
        t = t.detach().float().cpu()
    if t.dim() == 1 and arch in PLUS_ONE_NORMS and name.endswith("norm.weight"):
        t = t + 1                                      # gemma computes x * (1 + w); llama.cpp stores 1 + w
    if arch in PERMUTED and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = config.num_attention_heads if name.endswith("attn_q.weight") else config.num_key_value_heads
        t = t[rope_rows(t.shape[0], heads)]
    if packed is not None and unit in packed:
        return np.ascontiguousarray(t.numpy())
    if type_name == "F32":
        return t.numpy().astype(np.float32)
    if type_name == "F16":
        return t.half().numpy()
    h = None if importance is None else importance.get(unit)
    if t.dim() == 3:                                   # MoE experts: their rows one after another
        return np.concatenate([layout.pack(quantize(t[e], type_name, None if h is None else h[e]))
                               for e in range(t.shape[0])])
    return layout.pack(quantize(t, type_name, h))


def rope_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's converter gives q/k of the llama architecture: within each head, the two
    halves of the rotary dimensions interleaved (row i of the result is row ``index[i]`` of the HF weight)."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, 2, half).transpose(1, 2).reshape(-1)


def _file_type(types: dict[str, str]) -> int:
    """llama.cpp's ``general.file_type`` of the most common type (informational: readers use tensor types)."""
    import gguf
    common = Counter(types.values()).most_common(1)[0][0] if types else "F16"
    ftypes = {"F16": "MOSTLY_F16", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
              "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
              "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0"}
    return int(getattr(gguf.LlamaFileType, ftypes[common]))


def _copy_metadata(w, source: Path) -> None:
    from gguf import GGUFValueType

    from .reader import metadata
    for key, (vtype, value, sub) in metadata(source).items():
        if key.startswith(SKIP_KEYS) or key == "general.architecture":
            continue
        w.add_key_value(key, value, GGUFValueType(vtype), sub_type=None if sub is None else GGUFValueType(sub))


def _hf_metadata(w, config, arch: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    w.add_name(Path(getattr(config, "_name_or_path", "") or arch).name or arch)     # the folder's name, not its path
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(config.vocab_size)
    if getattr(config, "num_experts", None):
        w.add_expert_count(config.num_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
