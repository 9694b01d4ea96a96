"""Budgets as users state them (issue #34): a file size, turned into the bits per weight the solvers take.

    parse_size("240MB")             bytes (B, KB/MB/GB: powers of 1000; KiB/MiB/GiB: powers of 1024)
    size_units(model)               the token embedding and an untied output head: with --size they are
                                    units like any layer (every byte of the file is the solver's)
    bits_for_size(...)              the budget in bits per planned weight that fills ``size`` bytes of the
                                    format (gguf, compressed-tensors or gptq)
    predicted_bytes(...)            the exact size ``apply --format F`` writes for a plan

A checkpoint folder (compressed-tensors, GPTQ: alloc/formats/sizes.py) stores its scales in its own dtypes
(compressed-tensors: float32, twice our fp16), so its planned bytes are the true bits plus a per-weight
overhead the first plan measures; the plan is solved again, smaller, while the exact count passes the size.

A GGUF file is its header (metadata, tokenizer, tensor table), then every tensor padded to the alignment. The
planned units' bytes are the solver's (ggml options: each type at its true size, fallbacks included); the rest
(norms in F32, unplanned matrices in F16) is fixed. So the budget is (size − fixed bytes − worst-case padding)
× 8 over the planned weights, and the plan's exact size is checked by writing the header alone.
"""
from __future__ import annotations

import re
import warnings

from .errors import SettingError

SCALE = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
PAD = 32                  # GGUF's default alignment: a tensor's data takes up to PAD − 1 bytes of padding


def parse_size(text) -> int:
    """Bytes of a size such as 240MB, 0.25GB, 230MiB or 241961920."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in SCALE:
            raise SettingError("size", f"{{name}} {text!r} is not a size: give bytes or a number with B, KB, MB, GB, "
                                       "KiB, MiB or GiB (e.g. 240MB)")
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * SCALE[unit])
    if size <= 0:
        raise SettingError("size", f"{{name}} {text!r} must be more than 0 bytes")
    return size


def size_units(model) -> list[str]:
    """Module names of the token embedding and, unless tied to it, the output head."""
    from .units import embedding_and_head
    emb, head, tied = embedding_and_head(model)
    return [name for name, module in model.named_modules()
            if module is emb or (module is head and head is not None and not tied)]


def _types(model, plan, units) -> dict[str, str]:
    from .ggml.checkpoint import embedding_type
    from .ggml.plan_types import plan_types
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # fallback notices: apply says them
        types = plan_types(plan, units)
    return {**types, **embedding_type(model, types, "Q8_0")}


def predicted_bytes(model, tokenizer, plan, units, fmt: str = "gguf") -> int:
    """The exact bytes ``apply --format fmt`` writes for ``plan`` (a GGUF file, or every file of a folder)."""
    if fmt != "gguf":
        from .formats.sizes import folder_bytes
        return folder_bytes(fmt, model, tokenizer, plan, units)
    from .ggml.writer import file_bytes
    return file_bytes(model, tokenizer, _types(model, plan, units))


def size_floor(model, tokenizer, units, options, fmt: str = "gguf") -> tuple[float, float]:
    """(fixed, smallest): the bytes of a ``fmt`` output no plan changes (GGUF: with worst-case padding; a folder:
    its format's overhead over our true bits, measured on the widest option), and the planned units' bytes at
    their narrowest options."""
    from .plan import BitPlan
    if fmt == "gguf":
        from .ggml.writer import nbytes
        from .options import QuantSpec
        probe = BitPlan.from_choice(units, [QuantSpec.of_ggml("Q8_0")] * len(units))
        types = _types(model, probe, units)
        planned = sum(nbytes((u.shape[0], u.shape[1]), types[u.name]) for u in units)
        fixed = predicted_bytes(model, tokenizer, probe, units) - planned + PAD * len(units)
    else:
        widest = max(options, key=lambda o: o.bits)
        probe = BitPlan.from_choice(units, [widest] * len(units))
        planned = sum(widest.size_bits(u.shape) for u in units) / 8
        fixed = predicted_bytes(model, tokenizer, probe, units, fmt) - planned
    return fixed, sum(min(o.size_bits(u.shape) for o in options) for u in units) / 8


def bits_for_size(model, tokenizer, units, options, size: int, fmt: str = "gguf") -> float:
    """The true bits per planned weight that fill a ``size``-byte file of ``fmt`` (``size_floor``'s fixed bytes
    aside)."""
    fixed, smallest = size_floor(model, tokenizer, units, options, fmt)
    if size < fixed + smallest:
        need = fixed + smallest
        raise SettingError("size", f"{{name}} {size:,} B is below the smallest plan's {need:,.0f} B ({need / 1e6:.1f} "
                                   f"MB: the model's unplanned tensors and metadata take {fixed / 1e6:.1f} MB): give "
                                   f"at least {need / 1e6:.1f}MB")
    return (size - fixed) * 8 / sum(u.numel for u in units)
