"""GGUF files (llama.cpp's checkpoints) as models: ``--model FILE.gguf``, ``allocate("x.gguf", …)``.

transformers' GGUF loader (with the ``gguf`` package) dequantizes the file into a Hugging Face model. That
loader is slow (about 35 s for Gemma-3-270M: it parses the 262k-token vocabulary twice) and briefly takes
several times the model's memory, so the first load converts the file once, in a child process, into a
cached safetensors folder in the requested dtype; every later load maps that folder like any checkpoint.

    ~/.cache/bitalloc/gguf/<file hash>-<dtype>/   config.json, model.safetensors, tokenizer files

The model's identity is the GGUF file itself: its id is the file name and its hash the file's content hash
(``model.bitalloc_file_hash``), so plans and tables made from the file and from its cache agree. Its
"full-precision" reference is the dequantized file: a Q4_K_M GGUF's weights already lie on Q4_K/Q6_K grids.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import BitallocError

MAGIC = b"GGUF"
DEFAULT_DTYPE = "bf16"      # "auto" for a GGUF: its weights are quantized, bf16 holds them as the model was trained


def is_gguf(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def check_gguf(path: str | os.PathLike) -> Path:
    """A readable GGUF file, or a one-line error saying what it is instead."""
    path = Path(path)
    if not os.access(path, os.R_OK):
        raise BitallocError(f"GGUF file {str(path)!r} is not readable: check its permissions")
    if not is_gguf(path):
        raise BitallocError(f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'): give a .gguf file "
                            "from llama.cpp or a Hugging Face model folder")
    return path


def file_hash(path: str | os.PathLike) -> str:
    """blake2b (12 bytes) of the file's bytes, read in 16 MiB pieces."""
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def converted_folder(path: str | os.PathLike, dtype_name: str, cache: Path) -> tuple[Path, str]:
    """(the cached Hugging Face folder of the GGUF file at ``path`` in ``dtype_name``, the file's hash),
    converting it first when it is not cached yet (one line says so: it takes a while)."""
    path = check_gguf(path)
    digest = file_hash(path)
    folder = cache / "gguf" / f"{digest}-{dtype_name}"
    if (folder / "config.json").is_file():
        return folder, digest
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"bitalloc: converting {path.name} once into {folder} ({dtype_name}; later loads use it)",
          file=sys.stderr)
    from ..files import clean_stale, temp_prefix
    clean_stale(folder.parent)                            # a conversion killed half-way
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(folder.name), dir=folder.parent))
    try:
        done = subprocess.run([sys.executable, "-m", "bitalloc.models.gguf", str(path.resolve()), str(tmp), dtype_name],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = [s for s in done.stderr.strip().splitlines() if s.strip()]
            raise BitallocError(f"transformers could not load the GGUF file {str(path)!r}: "
                                f"{(lines or ['no message'])[-1][:300]} (is its architecture one transformers' GGUF "
                                "loader knows? `pip install gguf` if it says the package is missing)")
        try:
            os.replace(tmp, folder)                       # whole or not at all
        except OSError:
            if not (folder / "config.json").is_file():    # another process converted it meanwhile: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, digest


def _convert(src: str, dst: str, dtype_name: str) -> None:
    """The child process: load ``src`` with transformers' GGUF loader in ``dtype_name``, save it to ``dst``."""
    import functools

    import gguf
    import torch
    import transformers
    # transformers parses the file's metadata for the config, the weights and the tokenizer: once is enough
    # (gguf's reader took 20 s per parse of Gemma-3's 262k-token vocabulary)
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(gguf.GGUFReader)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    folder, name = os.path.dirname(src), os.path.basename(src)
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    archs = getattr(config, "architectures", None) or []
    auto = transformers.AutoModelForCausalLM if not archs or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else transformers.AutoModel
    model = auto.from_pretrained(folder, gguf_file=name, dtype=dtype)
    model.config.dtype = dtype
    model.hf_quantizer = None                       # the weights are plain floats now: save them as such
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(dst)
    transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(dst)


if __name__ == "__main__":
    _convert(*sys.argv[1:4])
