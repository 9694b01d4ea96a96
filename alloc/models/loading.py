"""Loading models from local paths, the embedded default model, and content hashes."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import BitallocError

# The default model ships inside the package (package data), so a plain `pip install` finds it.
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "model-data" / "refllama-s"


def default_model_path() -> Path:
    env = os.environ.get("BITALLOC_DEFAULT_MODEL")
    path = Path(env) if env else DEFAULT_MODEL
    if not (path / "config.json").is_file():
        raise BitallocError(f"the default model is not at {path}: pass --model PATH (a local Hugging Face model folder)")
    return path


DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``auto``/None (the checkpoint's own dtype), bf16, fp16, fp32, or one of those torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, str) and dtype in ("bfloat16", "float16", "float32"):
        return getattr(torch, dtype)
    raise BitallocError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype a checkpoint stores its weights in, from its config (float32 when it does not say)."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d.removeprefix("torch."), None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


FP32_SHARE_OF_RAM = 0.25       # "auto" widens a half-precision checkpoint to fp32 only below this share of RAM


def fast_half_on_cpu() -> bool:
    """Whether this CPU multiplies bf16/fp16 matrices in hardware (AVX512-BF16 or AMX). Without them PyTorch
    emulates the half types: 45× slower than fp32 on a 2-core AMD EPYC without AVX-512 (1.42 s vs 0.031 s for a
    512×1024 by 1024×1024 product)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def compute_dtype(source: torch.dtype, folder: Path) -> torch.dtype:
    """The dtype "auto" loads a checkpoint in: its own, except a half-precision checkpoint on a machine whose
    work runs on a CPU that has no half-precision arithmetic (no CUDA device, no AVX512-BF16/AMX), which is
    widened to fp32 when that copy takes at most a quarter of the RAM (the embedded model: 76 MB). Packed
    checkpoints still store the unquantized tensors in the source dtype (``bitalloc_source_dtype``)."""
    if source == torch.float32 or torch.cuda.is_available() or fast_half_on_cpu():
        return source
    weights = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(folder).glob("*.bin"))
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return torch.float32 if 0 < 2 * weights <= FP32_SHARE_OF_RAM * ram else source


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer of a local model folder (what ``load_model`` records as ``model.bitalloc_folder``)."""
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitallocError(f"could not load the tokenizer of {str(folder)!r}: {first[:300]} (copy tokenizer.json and "
                            "tokenizer_config.json from the original model)") from None


def tokenizer_for(model, tokenizer=None):
    """``tokenizer`` when given, else the one in the folder ``load_model`` read the model from, else None."""
    if tokenizer is None and getattr(model, "bitalloc_folder", None):
        return load_tokenizer(model.bitalloc_folder)
    return tokenizer


def load_model(path: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = "auto",
               attn: str | None = None, tokenizer: bool = True):
    """(model, tokenizer, kind) from a local Hugging Face folder or a GGUF file (models/gguf.py: bf16 unless
    ``dtype`` says otherwise); kind is "causal_lm" or "encoder". ``tokenizer=False``: None in its place
    (``load_tokenizer(model.bitalloc_folder)`` loads it when needed: Gemma-3's takes 330 MB).

    ``dtype``: "auto" (default) keeps the checkpoint's own dtype (bf16/fp16 for LLMs), so memory is what the
    checkpoint takes, except on a CPU without half-precision arithmetic (``compute_dtype``); "fp32" etc.
    override it. The source dtype is kept as ``model.bitalloc_source_dtype``:
    packed checkpoints store every unquantized tensor in it."""
    import transformers
    from safetensors import SafetensorError
    dtype = parse_dtype(dtype)
    given = path is not None
    path = check_model_path(path) if given else default_model_path()
    gguf_file = None
    from .gguf import DEFAULT_DTYPE
    if path.is_file():                    # a GGUF file: converted once into a cached folder (models/gguf.py)
        from ..files import cache_dir
        from .gguf import converted_folder
        gguf_file = path                  # converted in bf16 (or the dtype asked), loaded as "auto" says below
        path, digest = converted_folder(path, dtype_name(dtype or DTYPES[DEFAULT_DTYPE]), cache_dir())
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if attn:
        kwargs = {"attn_implementation": attn}
    else:
        kwargs = {}
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        source = checkpoint_dtype(config)
        kwargs.update(dtype=dtype or compute_dtype(source, path), local_files_only=True)
        archs = getattr(config, "architectures", None) or []
        if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            model, kind = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs), "causal_lm"
        else:
            model, kind = transformers.AutoModel.from_pretrained(path, **kwargs), "encoder"
        tokenizer = load_tokenizer(path) if tokenizer else None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:   # SafetensorError: truncated file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitallocError(f"could not load a model from {str(path)!r}: {first[:300]} (is a weight file "
                            "truncated or of another format? re-download or re-save the model)") from None
    model.eval()
    model.name_or_path = str(path)
    model.bitalloc_folder = str(path)                         # where the tokenizer and config are (GGUF: converted)
    model.bitalloc_given_path = str(path) if given else None     # plans record the path only as the user gave it
    model.bitalloc_source_dtype = source
    if gguf_file is not None:             # the model is the file: its name, its bytes (and the dtype it is read in)
        model.name_or_path = model.bitalloc_given_path = str(gguf_file)
        converted = dtype_name(dtype or DTYPES[DEFAULT_DTYPE])            # the bytes read, as converted
        model.bitalloc_file_hash = hashlib.blake2b(f"{digest}:{converted}".encode(), digest_size=12).hexdigest()
    return model, tokenizer, kind


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_model_path(path: str | os.PathLike) -> Path:
    """A local model: a folder holding config.json, or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise BitallocError(f"model path {str(path)!r} does not exist: give a local folder with config.json or a "
                            ".gguf file")
    if path.is_file():
        from .gguf import check_gguf
        return check_gguf(path)
    if not (path / "config.json").is_file():
        raise BitallocError(f"{str(path)!r} is not a model folder (no config.json): give a Hugging Face model folder "
                            "or a .gguf file")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise BitallocError(f"model folder {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, …): "
                            "copy tokenizer.json (or tokenizer.model) and tokenizer_config.json from the original model")
    return path


# what a folder needs for AutoTokenizer to build a tokenizer (one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
