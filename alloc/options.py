"""Candidate quantization formats (QuantSpec) and their TRUE storage cost.

The true cost counts everything the packer stores (kernels/pack.py): codes, fp16 scales and packed zero
points, padding included. ``count_overhead=False`` gives the nominal cost (just ``bits``), the convention of
the EvoPress and BAQ papers; plans report both.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import BitallocError
from .kernels.pack import SUPPORTED_BITS, packed_size_bits

DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_GROUP_SIZE = 128


@dataclass(frozen=True, order=True)
class QuantSpec:
    """One storage format for a weight matrix.

    bits:       width of each integer code (2, 3, 4, 5, 6 or 8; 16 means "keep in fp16", no quantization).
    group_size: weights along the input dimension that share one scale (and zero); a multiple of 32, or -1
                for one group per output row.
    symmetric:  True stores no zero point (codes centred on 2**(bits-1)); False stores one per group.
    ggml:       a llama.cpp weight type (``--options ggml``: Q2_K … Q8_0, alloc/ggml/types.py) instead of our
                packed format: its own blocks, its true size, our importance-weighted quantizer; written by
                ``apply --format gguf``. On rows that are not a multiple of its block it is stored as
                llama.cpp's fallback type (``ggml_for``), whose size and rounding it then has.
    """

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = False
    ggml: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise BitallocError(f"bits must be an integer, got {self.bits!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise BitallocError(f"group_size must be an integer, got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise BitallocError(f"symmetric must be true or false, got {self.symmetric!r}")
        if self.bits != 16 and self.bits not in SUPPORTED_BITS:
            raise BitallocError(
                f"{self.bits}-bit weights cannot be stored: choose bits from {list(SUPPORTED_BITS)} (or 16 = fp16)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 32):
            raise BitallocError(f"group_size {self.group_size} is not storable: use a multiple of 32, or -1 per row")
        if self.ggml:
            from .ggml.types import get_type
            t = get_type(self.ggml)
            if (self.bits, self.group_size, self.symmetric) != (t.bits, t.block, not t.affine):
                raise BitallocError(f"ggml type {t.name} is {t.bits}-bit, blocks of {t.block}, "
                                    f"{'asymmetric' if t.affine else 'symmetric'}: make it with QuantSpec.of_ggml")

    @classmethod
    def of_ggml(cls, name: str) -> "QuantSpec":
        """The option of llama.cpp's type ``name`` (e.g. "Q4_K")."""
        from .ggml.types import get_type
        t = get_type(name)
        return cls(t.bits, t.block, not t.affine, t.name)

    def ggml_for(self, in_features: int) -> str:
        """The ggml type a matrix with rows of ``in_features`` weights is stored in (llama.cpp's fallback when
        the type's block does not divide them)."""
        from .ggml.types import FALLBACK, TYPES
        name = self.ggml
        if not TYPES[name].fits(in_features):
            name = FALLBACK.get(name, name)
        if not TYPES[name].fits(in_features):
            raise BitallocError(f"rows of {in_features} weights fit no ggml block ({name}): keep this layer at 16 bits")
        return name

    @property
    def is_float(self) -> bool:
        return self.bits == 16

    def size_bits(self, shape: tuple[int, int], *, count_overhead: bool = True) -> int:
        """Bits needed to store a weight of ``shape`` = (out, in) in this format."""
        out_features, in_features = shape
        if self.ggml:                               # the type its rows are stored in (a fallback's own size)
            from .ggml.types import TYPES
            t = TYPES[self.ggml_for(in_features)]
            n = out_features * in_features
            return n * t.bits if not count_overhead else n // t.block * t.block_bytes * 8
        if self.is_float or not count_overhead:
            return self.bits * out_features * in_features
        return packed_size_bits(out_features, in_features, self.bits, self.group_size, self.symmetric)

    def bits_per_weight(self, shape: tuple[int, int], *, count_overhead: bool = True) -> float:
        """TRUE bits per weight (codes + scales + zeros); e.g. 3-bit g128 asym on (4096, 4096) -> 3.1484."""
        return self.size_bits(shape, count_overhead=count_overhead) / (shape[0] * shape[1])

    def label(self) -> str:
        if self.is_float:
            return "fp16"
        if self.ggml:
            return self.ggml
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}{group}{'s' if self.symmetric else ''}"

    def to_json(self) -> dict:
        out = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        return {**out, "ggml": self.ggml} if self.ggml else out


GGML_OPTIONS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")     # --options ggml


def parse_options(text: str | None, *, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False) -> list[QuantSpec]:
    """``"2,3,4,8"`` -> QuantSpecs at ``group_size``; an item may carry its own group: ``"3g64"``. ``"ggml"``:
    llama.cpp's K-quants and Q8_0 (GGML_OPTIONS); a ggml type may also be named alone: ``"q3_k,q4_k,q6_k"``."""
    if text is None or not text.strip():
        return [QuantSpec(b, group_size, symmetric) for b in DEFAULT_BITS]
    if text.strip().lower() == "ggml":
        return [QuantSpec.of_ggml(n) for n in GGML_OPTIONS]
    specs = []
    for item in text.split(","):
        item = item.strip().lower()
        if item.startswith("q") or item.startswith("f16"):
            specs.append(QuantSpec(16) if item == "f16" else QuantSpec.of_ggml(item))
            continue
        bits_text, _, group_text = item.partition("g")
        try:
            bits = int(bits_text)
            group = int(group_text) if group_text else group_size
        except ValueError:
            raise BitallocError(f"option {item!r} is not understood: write bit widths like 2,3,4,8 or 3g64") from None
        specs.append(QuantSpec(bits, group, symmetric))
    if len(set(specs)) != len(specs):
        raise BitallocError(f"options {text!r} name the same format twice: list each once")
    return sorted(specs)
