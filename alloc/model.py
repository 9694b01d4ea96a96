"""Loading models from local paths, the embedded default model, and content hashes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .errors import BitallocError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "examples" / "models" / "refllama-s"


def default_model_path() -> Path:
    env = os.environ.get("BITALLOC_DEFAULT_MODEL")
    path = Path(env) if env else DEFAULT_MODEL
    if not (path / "config.json").is_file():
        raise BitallocError(f"the default model is not at {path}: pass --model PATH (a local Hugging Face model folder)")
    return path


def load_model(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
               attn: str | None = None):
    """(model, tokenizer, kind) from a local Hugging Face folder; kind is "causal_lm" or "encoder"."""
    import transformers
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        raise BitallocError(f"model path {str(path)!r} does not exist: give a local folder with config.json")
    if not (path / "config.json").is_file():
        raise BitallocError(f"{str(path)!r} is not a model folder (no config.json): give a Hugging Face model folder")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    kwargs = {"dtype": dtype, "local_files_only": True}
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            model, kind = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs), "causal_lm"
        else:
            model, kind = transformers.AutoModel.from_pretrained(path, **kwargs), "encoder"
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitallocError(f"could not load a model from {str(path)!r}: {first}") from None
    model.eval()
    model.name_or_path = str(path)
    return model, tokenizer, kind


def model_hash(model: nn.Module) -> str:
    """Content hash of every parameter and buffer (names, shapes, dtypes and bytes)."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in list(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


def model_info(model: nn.Module, path: str | None = None) -> dict:
    return {"id": Path(path or getattr(model, "name_or_path", "") or "model").name,
            "path": str(path or getattr(model, "name_or_path", "")),
            "architecture": type(model).__name__,
            "hash": model_hash(model)}
