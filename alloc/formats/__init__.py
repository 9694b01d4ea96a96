"""Checkpoints for other serving engines, written from bitalloc's own codes: compressed-tensors, GPTQ (this
folder) and GGUF (alloc/ggml/). ``write`` is what ``apply(model, plan, format=…, out=…)`` calls."""
from __future__ import annotations

import os

from ..errors import BitallocError

FORMATS = ("bitalloc", "gptq", "compressed-tensors", "gguf")


def write(model, plan, out: str | os.PathLike, fmt: str, *, tokenizer=None, quantizer: str = "rtn",
          calibration=None, exact: bool = False, force: bool = False, info: dict | None = None,
          progress: bool = True, imatrix: str | os.PathLike | None = None) -> dict:
    """Write ``model`` quantized by ``plan`` as a checkpoint in ``fmt`` (gptq, compressed-tensors or gguf) at
    ``out``; the model's own weights are left as they are. The tokenizer is the one given, else the one in
    the folder the model was loaded from (needed for gguf, copied into the folders when known). ``imatrix``
    (gguf only): also write llama.cpp's imatrix file of the calibration there. Returns the writer's report
    with "path" and "format" added."""
    if fmt not in FORMATS[1:]:
        raise BitallocError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    from ..models.loading import tokenizer_for
    tokenizer = tokenizer_for(model, tokenizer)
    if imatrix is not None and fmt != "gguf":
        raise BitallocError("imatrix= writes llama.cpp's imatrix file: it goes with format='gguf'")
    if fmt == "gguf":
        if tokenizer is None:
            raise BitallocError("format 'gguf' stores the tokenizer in the file: pass tokenizer= (the model was not "
                                "loaded from a folder that has one)")
        from ..ggml.checkpoint import save_gguf
        report = save_gguf(model, plan, out, tokenizer=tokenizer, calibration=calibration, exact=exact, force=force,
                           info=info, progress=progress, imatrix=imatrix, quantizer=quantizer)
    elif fmt == "gptq":
        from . import gptq
        report = gptq.save(model, plan, out, tokenizer=tokenizer, quantizer=quantizer, calibration=calibration,
                           force=force, info=info, progress=progress)
    else:
        from . import compressed_tensors
        report = compressed_tensors.save(model, plan, out, tokenizer=tokenizer, quantizer=quantizer,
                                         calibration=calibration, exact=exact, force=force, info=info,
                                         progress=progress)
    return {**report, "path": str(out), "format": fmt}
