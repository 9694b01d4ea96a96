"""Memory at a context length (issue #34): what llama.cpp holds beside a GGUF's weights when it runs the model
with ``context`` tokens, so a budget given as memory becomes a file size (``--memory 1GiB --context 8192``).

    footprint(config, context, kv_type, batch)   -> Footprint: KV cache, compute and output buffers, bytes

What llama.cpp allocates (the build the llama-cpp-python 0.3.36 sdist vendors, with its library defaults; the
figures it prints when it loads a model, checked against these in examples/bench_memory.py):
- weights: the GGUF file, memory-mapped (its size is the model buffer llama.cpp reports);
- KV cache: every layer keeps K and V for each cell, n_kv_heads × head_dim values each in the cache type
  (f16 2 bytes a value; q8_0 34 and q4_0 18 bytes per 32); the cells are the context rounded up to 256, times
  the sequences (``batch``). Sliding-window layers (Gemma-3: five in six) hold as many: the library's default
  is the full-size SWA cache. llama-server and llama-cli turn that off (n_swa + 512 cells there), so they need
  less than predicted, never more;
- output buffer: one token's logits per sequence (n_vocab float32);
- compute buffer: the graph of a 512-token micro-batch at its largest live set, taken as the larger of its
  logits (n_vocab × 512 float32) and its attention scores (n_heads × cells × 512 float32), plus a few hidden
  states. That is a model of ggml's allocator, not its arithmetic: bench_memory.py says how close it comes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from . import checks
from .errors import SettingError

KV_TYPES = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}     # bytes per block of values, values per block
PAD_CELLS = 256            # llama.cpp rounds the context up to this many cells
UBATCH = 512               # llama.cpp's default micro-batch: the compute graph is reserved for it


@dataclass(frozen=True)
class Footprint:
    """Bytes llama.cpp holds at a context beside the weights."""
    context: int
    cells: int
    kv_type: str
    kv_bytes: int
    compute_bytes: int
    output_bytes: int

    @property
    def total(self) -> int:
        return self.kv_bytes + self.compute_bytes + self.output_bytes

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def footprint(config, context: int, kv_type: str = "f16", batch: int = 1) -> Footprint:
    """What llama.cpp holds beside the weights of a model with Hugging Face ``config`` at ``context`` tokens for
    ``batch`` sequences, its KV cache in ``kv_type``."""
    c = _text_config(config)
    checks.one_of(kv_type, list(KV_TYPES), "kv_type")
    limit = getattr(c, "max_position_embeddings", None)
    if context <= 0:
        raise SettingError("context", "{name} must be a positive number of tokens")
    if limit and context > limit:
        raise SettingError("context", f"{{name}} {context:,} is over the model's maximum of {limit:,} tokens: "
                                      f"give at most {limit:,}")
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    cells = -(-context // PAD_CELLS) * PAD_CELLS * batch
    per_block, block = KV_TYPES[kv_type]
    row = -(-kv_heads * head_dim // block) * per_block                      # one cell's K (or V) in one layer
    kv = c.num_hidden_layers * cells * 2 * row
    logits = c.vocab_size * UBATCH * 4
    scores = heads * cells * UBATCH * 4
    compute = max(logits, scores) + 2 * UBATCH * c.hidden_size * 4
    return Footprint(context, cells, kv_type, kv, compute, c.vocab_size * 4 * batch)


def size_for_memory(model, tokenizer, units, options, memory: int, context: int, kv_type: str = "f16",
                    batch: int = 1) -> tuple[int, dict]:
    """(the GGUF bytes ``memory`` leaves the weights at ``context``, the breakdown a plan records); a memory
    below the smallest plan's needs is one line giving that minimum."""
    from .budgets import size_floor
    held = footprint(model.config, context, kv_type, batch)
    fixed, smallest = size_floor(model, tokenizer, units, options, "gguf")
    need = held.total + fixed + smallest
    buffers = held.compute_bytes + held.output_bytes
    if memory < need:
        raise SettingError("memory", f"{{name}} {memory:,} B is below what the smallest plan needs at {context:,} "
                                     f"tokens: {need:,.0f} B (its GGUF {fixed + smallest:,.0f} B, KV cache "
                                     f"{held.kv_bytes:,} B, llama.cpp's buffers {buffers:,} B): give at least "
                                     f"{-(-int(need) // 2**20)}MiB, or a shorter --context or --kv-type q8_0")
    return memory - held.total, {"asked_bytes": memory, "engine": "llama.cpp", "batch": batch, **held.as_dict()}
