"""--memory's model of llama.cpp (alloc/memory.py) against llama.cpp itself: for a GGUF bitalloc wrote, the
bytes llama.cpp reports when it loads the file at each context (its model, KV cache, compute and output
buffers, read from its own load log through llama-cpp-python) beside what ``footprint`` predicts.

    python examples/bench_memory.py --gguf out.gguf --model gemma.gguf --contexts 2048,8192
    python examples/bench_memory.py --gguf out.gguf --contexts 512,1024     # refllama-s (the default --model)

``--model``: the model the GGUF was planned from (its Hugging Face config gives the shapes; a .gguf source is
converted once into the cache, as `allocate` does). Prints one row per context and the total's error.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path

MIB = re.compile(r"(CPU_Mapped model|KV|compute|output) buffer size\s*=\s*([0-9.]+) MiB")


@contextlib.contextmanager
def captured_stderr():
    """What llama.cpp writes to file descriptor 2 (and Python to sys.stderr) meanwhile, as a list of one string."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as f:
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stderr(f):
                yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            out.append(f.read())


def reported(gguf: str, context: int, kv_type: str) -> dict[str, float]:
    """Bytes llama.cpp reports for ``gguf`` at ``context`` (model, kv, compute, output), from its load log."""
    import llama_cpp
    types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
    with captured_stderr() as log:
        model = llama_cpp.Llama(model_path=gguf, n_ctx=context, n_threads=1, verbose=True,
                                type_k=types[kv_type], type_v=types[kv_type],
                                flash_attn=kv_type != "f16")      # llama.cpp quantizes V only with flash attention
        del model
    sums = {"model": 0.0, "kv": 0.0, "compute": 0.0, "output": 0.0}
    for kind, mib in MIB.findall(log[0]):
        key = {"CPU_Mapped model": "model", "KV": "kv"}.get(kind, kind)
        sums[key] += float(mib) * 2**20
    return sums


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="a GGUF bitalloc wrote (apply --format gguf)")
    p.add_argument("--model", default=None, help="the model it was planned from (default: the embedded refllama-s)")
    p.add_argument("--contexts", default="2048,8192")
    p.add_argument("--kv-type", default="f16", choices=["f16", "q8_0", "q4_0"])
    args = p.parse_args()
    from transformers import AutoConfig

    from bitalloc.memory import footprint
    from bitalloc.models.gguf import converted_folder, is_gguf
    from bitalloc.files import cache_dir
    folder = args.model or str(Path(__import__("bitalloc").__file__).parent / "model-data" / "refllama-s")
    if is_gguf(folder):
        folder = str(converted_folder(folder, "bf16", cache_dir())[0])
    config = AutoConfig.from_pretrained(folder)
    file_bytes = Path(args.gguf).stat().st_size
    print(f"{args.gguf}: {file_bytes:,} B; KV cache {args.kv_type}; llama.cpp through llama-cpp-python "
          f"(library defaults: full-size SWA cache, 512-token micro-batch)")
    print(f"{'context':>8} {'part':<8} {'llama.cpp MiB':>14} {'predicted MiB':>14} {'error':>8}")
    for context in [int(c) for c in args.contexts.split(",")]:
        got = reported(args.gguf, context, args.kv_type)
        held = footprint(config, context, args.kv_type)
        want = {"model": file_bytes, "kv": held.kv_bytes, "compute": held.compute_bytes, "output": held.output_bytes}
        for part in ("model", "kv", "compute", "output"):
            print(f"{context:>8} {part:<8} {got[part] / 2**20:>14.2f} {want[part] / 2**20:>14.2f} "
                  f"{(want[part] - got[part]) / max(got[part], 1):>+8.2%}")
        total_got, total_want = sum(got.values()), sum(want.values())
        print(f"{context:>8} {'total':<8} {total_got / 2**20:>14.2f} {total_want / 2**20:>14.2f} "
              f"{(total_want - total_got) / total_got:>+8.2%}")


if __name__ == "__main__":
    main()
