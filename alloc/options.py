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
    """

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = False

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

    @property
    def is_float(self) -> bool:
        return self.bits == 16

    def size_bits(self, shape: tuple[int, int], *, count_overhead: bool = True) -> int:
        """Bits needed to store a weight of ``shape`` = (out, in) in this format."""
        out_features, in_features = shape
        if self.is_float or not count_overhead:
            return self.bits * out_features * in_features
        return packed_size_bits(out_features, in_features, self.bits, self.group_size, self.symmetric)

    def bits_per_weight(self, shape: tuple[int, int], *, count_overhead: bool = True) -> float:
        """TRUE bits per weight (codes + scales + zeros); e.g. 3-bit g128 asym on (4096, 4096) -> 3.1484."""
        return self.size_bits(shape, count_overhead=count_overhead) / (shape[0] * shape[1])

    def label(self) -> str:
        if self.is_float:
            return "fp16"
        group = "row" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}{group}{'s' if self.symmetric else ''}"

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def parse_options(text: str | None, *, group_size: int = DEFAULT_GROUP_SIZE, symmetric: bool = False) -> list[QuantSpec]:
    """``"2,3,4,8"`` -> QuantSpecs at ``group_size``; an item may carry its own group: ``"3g64"``."""
    if text is None or not text.strip():
        return [QuantSpec(b, group_size, symmetric) for b in DEFAULT_BITS]
    specs = []
    for item in text.split(","):
        item = item.strip().lower()
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
