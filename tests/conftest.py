import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REFLLAMA = REPO / "alloc" / "model-data" / "refllama-s"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))


def _save_with_tokenizer(model, path: Path) -> Path:
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFLLAMA / name, path / name)
    return path


def _llama_dir(tmp_path_factory, name: str, hidden: int, intermediate: int) -> Path:
    """A 2-layer Llama (4 heads, 2 KV heads) with refllama-s's tokenizer and random weights, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return _save_with_tokenizer(LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with refllama-s's tokenizer and random weights, saved as a model folder."""
    return _llama_dir(tmp_path_factory, "tiny_llama", 64, 128)


@pytest.fixture(scope="session")
def k_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama whose rows are multiples of 256 (every K-quant and group size fits every layer)."""
    return _llama_dir(tmp_path_factory, "k_llama", 256, 512)


@pytest.fixture(scope="session")
def calib_text() -> str:
    from bitalloc.calibration import default_text
    return default_text()[:60000]


@pytest.fixture
def calib_file(tmp_path, calib_text) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(calib_text)
    return path
