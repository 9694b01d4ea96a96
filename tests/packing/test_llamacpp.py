"""llama.cpp itself reads bitalloc's GGUFs (issue #35), through llama-cpp-python (pip builds it from llama.cpp's
sources; .ci/run installs it): every weight type we write decodes in llama.cpp to the numbers our fake-quantized
model computes with, for a dense model (refllama-s) and an MoE one, and llama.cpp splits text into exactly the
token ids the model's own tokenizer gives, for every pre-tokenizer family we name and for a GGUF source."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.ggml import vocab
from bitalloc.ggml.checkpoint import fake_quantize, save_gguf
from bitalloc.ggml.types import TYPES
from bitalloc.models import zoo
from bitalloc.options import QuantSpec
from bitalloc.plan import BitPlan
from bitalloc.units import find_units

from ..conftest import REFLLAMA

if os.environ.get("CI") == "true":
    import llama_cpp                               # CI installs it: a missing llama.cpp fails here, never skips
else:
    llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.filterwarnings("ignore::bitalloc.errors.BitallocWarning")     # hand-made plans

TEXT = ("The quick brown fox, 1234567 times: it's done.  Two  spaces,\n\n\ttabs; émigré café naïve 日本語 "
        "don't WE'LL <|endoftext|> x=3.14159e-2 'quoted' \"double\" end")


def _llama(path, **kw):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False, **kw)


def _cycled_plan(model, **find):
    """Every ggml type we write, in turn over the model's units (llama.cpp's fallbacks on narrow rows)."""
    units = find_units(model, **find)
    names = list(TYPES)
    return BitPlan.from_choice(units, [QuantSpec.of_ggml(names[i % len(names)]) for i in range(len(units))],
                               solver="manual")


def _compare(model, tokenizer, path, tmp_path, plan, ids):
    """llama.cpp's logits for IDS against our fake-quantized model's and the fp model's."""
    calib = torch.randint(0, 4000, (4, 64), generator=torch.Generator().manual_seed(0))
    r = save_gguf(model, plan, path, tokenizer=tokenizer, calibration=calib, progress=False)
    fake = copy.deepcopy(model)
    fake_quantize(fake, r["units"], r["importance"])
    llm = _llama(path)
    llm.eval(ids)
    theirs = torch.tensor(np.asarray(llm.scores[:len(ids)]), dtype=torch.float32)
    with torch.no_grad():
        ours = fake(torch.tensor([ids])).logits[0].float()
        fp = model(torch.tensor([ids])).logits[0].float()
    return r, theirs, ours, fp


def test_llama_cpp_computes_refllama_s_as_our_fake_quantized_model(tmp_path):
    """Each of the 10 types on some layer of refllama-s; llama.cpp rounds the activations (Q8_K/Q8_0) in its
    dot products, so its logits sit near ours, not on them: far nearer than the quantization moved them
    (measured: quantization moved them 5.0 %, llama.cpp is 0.8 % from ours)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(REFLLAMA, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFLLAMA)
    ids = tokenizer(TEXT * 2).input_ids[:160]
    r, theirs, ours, fp = _compare(model, tokenizer, tmp_path / "refllama.gguf", tmp_path, _cycled_plan(model), ids)
    assert set(r["types"]) >= {"Q2_K", "Q4_0", "Q8_0", "Q6_K"}                 # K-quants where rows allow, else fallbacks
    moved, off = (ours - fp).norm() / fp.norm(), (theirs - ours).norm() / ours.norm()
    assert moved > 0.02 and off < 0.3 * moved, (float(moved), float(off))
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.9


def test_llama_cpp_computes_a_qwen3_moe_as_our_fake_quantized_model(tmp_path):
    from transformers import AutoTokenizer
    torch.manual_seed(0)
    model = zoo.tiny("qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=768,
                     norm_topk_prob=True, vocab_size=8192).eval()
    tokenizer = AutoTokenizer.from_pretrained(REFLLAMA)
    plan = _cycled_plan(model, experts="per-layer")
    ids = tokenizer(TEXT).input_ids[:64]
    r, theirs, ours, fp = _compare(model, tokenizer, tmp_path / "moe.gguf", tmp_path, plan, ids)
    moved, off = (ours - fp).norm() / fp.norm(), (theirs - ours).norm() / ours.norm()
    assert moved > 0.02 and off < 0.3 * moved, (float(moved), float(off))


def _tokenizer_folder(tmp_path, pre_tokenizer, *, ignore_merges=False, normalizer=None):
    """refllama-s's vocabulary and merges under another family's split rules, as a model folder."""
    spec = json.loads((REFLLAMA / "tokenizer.json").read_text())
    spec["pre_tokenizer"], spec["model"]["ignore_merges"] = pre_tokenizer, ignore_merges
    if normalizer is not None:
        spec["normalizer"] = normalizer
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(REFLLAMA / "tokenizer_config.json", folder / "tokenizer_config.json")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def _split(regex):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
FAMILIES = {
    "gpt-2": dict(pre_tokenizer=BYTE_LEVEL),
    "llama-bpe": dict(pre_tokenizer=_split(vocab.LLAMA3), ignore_merges=True),
    "qwen2": dict(pre_tokenizer=_split(vocab.QWEN2), normalizer={"type": "NFC"}),
    "smollm": dict(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}),
}


def _tiny_gguf(tokenizer, path):
    torch.manual_seed(0)
    model = zoo.tiny("llama3", vocab_size=len(tokenizer)).eval()
    plan = BitPlan.from_choice(find_units(model), [QuantSpec.of_ggml("Q8_0")] * len(find_units(model)),
                               solver="manual")
    save_gguf(model, plan, path, tokenizer=tokenizer, progress=False)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llama_cpp_tokenizes_as_the_model_s_tokenizer(family, tmp_path):
    tokenizer = _tokenizer_folder(tmp_path, **FAMILIES[family])
    path = tmp_path / "m.gguf"
    _tiny_gguf(tokenizer, path)
    import gguf
    fields = {f.name: f.contents() for f in gguf.GGUFReader(str(path)).fields.values()}
    assert fields["tokenizer.ggml.pre"] == family
    llm = _llama(path, vocab_only=True)
    for text in (TEXT, "  leading spaces", "1 22 333 4444 55555", "line\r\nbreaks\n\n\nthree"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text


def _sentencepiece_tokenizer(folder):
    """A Llama-2-style tokenizer.json, trained here: SentencePiece pieces (▁ for spaces, one put before the
    text), BPE merges, 256 byte pieces to fall back on, <s> added before each text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from bitalloc.calibration import default_text
    specials = ["<unk>", "<s>", "</s>"]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")       # words, as spm trains
    trainer_tok.train_from_iterator(default_text()[:200000].splitlines(), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, show_progress=False))
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])
                                                      if p not in specials]
    vocab = {**{t: i for i, t in enumerate(specials)}, **{p: i + len(specials) for i, p in enumerate(pieces)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                     for m in trained["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_llama_cpp_tokenizes_as_a_sentencepiece_tokenizer(tmp_path):
    tokenizer = _sentencepiece_tokenizer(tmp_path)
    path = tmp_path / "m.gguf"
    _tiny_gguf(tokenizer, path)
    import gguf
    fields = {f.name: f.contents() for f in gguf.GGUFReader(str(path)).fields.values()}
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"]
    llm = _llama(path, vocab_only=True)
    for text in (TEXT, "  leading spaces", "1 22 333 4444", "line\r\nbreaks\n\n\nthree", "end</s>after </s> x"):
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and len(ids) > 3
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text


def test_split_rules_llama_cpp_does_not_know_are_refused_in_one_line(tmp_path):
    tokenizer = _tokenizer_folder(tmp_path, _split(r"\p{L}+|\s+"))
    with pytest.raises(BitallocError, match="no pre-tokenizer known") as e:
        _tiny_gguf(tokenizer, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def test_a_gguf_source_keeps_its_tokenizer_for_llama_cpp(tmp_path, monkeypatch):
    """A .gguf given as the model: its tokenizer is copied into the file we write, and llama.cpp reads the
    text into the ids bitalloc's own loader of that file gives."""
    from transformers import AutoTokenizer

    from bitalloc.models.loading import load_model
    source = tmp_path / "source.gguf"
    _tiny_gguf(AutoTokenizer.from_pretrained(REFLLAMA), source)
    model, tokenizer, _ = load_model(source, dtype="fp32")
    plan = BitPlan.from_choice(find_units(model), [QuantSpec.of_ggml("Q4_0")] * len(find_units(model)),
                               solver="manual")
    out = tmp_path / "again.gguf"
    save_gguf(model, plan, out, tokenizer=tokenizer, progress=False)
    llm = _llama(out, vocab_only=True)
    assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == tokenizer(TEXT).input_ids
