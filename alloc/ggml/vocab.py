"""A Hugging Face tokenizer as llama.cpp reads it (``write_tokenizer``), and which of llama.cpp's
pre-tokenizers splits text as a byte-level BPE tokenizer does (``llama_cpp_pre``).

llama.cpp does not read the split rules from the file: a GGUF names them (``tokenizer.ggml.pre``) and llama.cpp
runs its own copy of that family's rules. A wrong name loads without a warning and tokenizes differently, so
the name is derived from the tokenizer's own pre-tokenizer spec (tokenizer.json) and anything not recognised is
refused, never guessed.
"""
from __future__ import annotations

import json
import re

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


def write_tokenizer(w, tokenizer, vocab_size: int) -> None:
    """A Hugging Face tokenizer's tokenizer.json as llama.cpp's keys: byte-level BPE (refllama-s, Llama 3,
    Qwen) as "gpt2" with the pre-tokenizer's name; BPE with byte fallback over SentencePiece pieces (Llama 2,
    Mistral folders) as "llama". Anything else is refused in one line."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise BitallocError(f"GGUF output writes BPE tokenizers only (this one is {model.get('type', 'unknown')}): "
                            "convert the model with llama.cpp's convert_hf_to_gguf.py, then give bitalloc the .gguf")
    vocab = dict(model["vocab"])
    special = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        special[added["id"]] = added.get("special", False)
    size = max(max(vocab.values()) + 1, vocab_size)          # the embedding's rows, padding included
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = CONTROL if special.get(i) else (USER_DEFINED if i in special else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        _sentencepiece(w, spec, tokens, types, merges)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(llama_cpp_pre(spec))
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    for what, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        value = getattr(tokenizer, what, None)
        if value is not None:
            add(int(value))
    ids = tokenizer("a", add_special_tokens=True).input_ids          # what the tokenizer adds around a text
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    w.add_add_bos_token(bos is not None and bool(ids) and ids[0] == bos)
    w.add_add_eos_token(eos is not None and len(ids) > 1 and ids[-1] == eos)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)


# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"                                      # SentencePiece's visible space
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _sentencepiece(w, spec: dict, tokens: list[str], types: list[int], merges: list[str]) -> None:
    """llama.cpp's "llama" tokenizer merges the adjacent pair whose joined piece scores highest; BPE merges
    the pair that comes first in its merge list. Scoring each piece by minus the rank of the merge that makes
    it gives the same merges. Spaces become ▁ and one is put before the text (add_space_prefix), as the
    Prepend + Replace normalizer of these folders does; the text is not split before merging."""
    normalizer = spec.get("normalizer") or {}
    parts = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [(s.get("type"), s.get("prepend"), (s.get("pattern") or {}).get("String"), s.get("content"))
             for s in parts]
    if kinds != [("Prepend", SPACE, None, None), ("Replace", None, " ", SPACE)] or spec.get("pre_tokenizer"):
        raise BitallocError("GGUF output: this SentencePiece-style tokenizer does not prepend ▁ and turn spaces into "
                            "▁ as llama.cpp's llama tokenizer does (normalizer Prepend + Replace, no pre-tokenizer): "
                            "convert the model with llama.cpp's convert_hf_to_gguf.py, then give bitalloc the .gguf")
    rank: dict[str, float] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", ""), -float(r))          # the piece's first (highest-priority) merge
    unk = spec.get("model", {}).get("unk_token")
    scores = [rank.get(t, 0.0) for t in tokens]
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and BYTE_PIECE.fullmatch(t):
            types[i] = BYTE
        elif t == unk:
            types[i] = UNKNOWN
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(True)
