"""Which of llama.cpp's pre-tokenizers splits text as a Hugging Face byte-level BPE tokenizer does.

llama.cpp does not read the split rules from the file: a GGUF names them (``tokenizer.ggml.pre``) and llama.cpp
runs its own copy of that family's rules. A wrong name loads without a warning and tokenizes differently, so
the name is derived from the tokenizer's own pre-tokenizer spec (tokenizer.json) and anything not recognised is
refused, never guessed.
"""
from __future__ import annotations

from ..errors import BitallocError

# The split patterns, as tokenizer.json spells them, of the families llama.cpp knows.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
         r"\s*[\r\n]+|\s+(?!\S)|\s+")
DIGITS = "digits"                                    # Digits(individual_digits=True): every digit on its own

# (pre-tokenizer steps, BPE's ignore_merges) -> llama.cpp's name for them (tokenizer.ggml.pre); llama.cpp
# looks a whole word up in the vocabulary before merging (ignore_merges) for llama-bpe only, of these
KNOWN = {
    ((GPT2,), False): "gpt-2",                 # GPT-2, refllama-s
    ((DIGITS, GPT2), False): "smollm",         # SmolLM
    ((LLAMA3,), True): "llama-bpe",            # Llama 3.x
    ((QWEN2,), False): "qwen2",                # Qwen2, Qwen2.5, Qwen3
}


def steps(pre: dict | None) -> tuple[str, ...]:
    """The splitting steps of a tokenizer.json pre_tokenizer, as patterns (ByteLevel's own regex is GPT2)."""
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in steps(p))
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            return ("ByteLevel(add_prefix_space)",)
        return (GPT2,) if pre.get("use_regex", True) else ()
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        if pre.get("behavior") != "Isolated" or pre.get("invert"):
            return (f"Split({regex!r}, {pre.get('behavior')}, invert={pre.get('invert')})",)
        return (regex,)
    if kind == "Digits":
        return (DIGITS,) if pre.get("individual_digits") else ("Digits(grouped)",)
    return (str(kind),)


def llama_cpp_pre(spec: dict) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json SPEC; a one-line refusal for any other split."""
    found = steps(spec.get("pre_tokenizer"))
    ignore_merges = bool(spec.get("model", {}).get("ignore_merges", False))
    name = KNOWN.get((found, ignore_merges))
    if name is None:
        said = " + ".join(found) or "no pre-tokenizer"
        raise BitallocError(f"GGUF output: llama.cpp has no pre-tokenizer known to split text as this tokenizer "
                            f"does ({said}{', ignore_merges' if ignore_merges else ''}): convert the model with llama.cpp's "
                            "convert_hf_to_gguf.py, then give bitalloc the .gguf")
    return name
