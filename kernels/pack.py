"""Packing integer codes into int32 words: the storage layout shared by the packer, the size accounting
(``QuantSpec.bits_per_weight``) and the kernels.

Every width is split into *planes* of 8, 4, 2 or 1 bits, so no value ever straddles a word:

    bits:   2     3       4     5       6       8
    planes: [2]   [2,1]   [4]   [4,1]   [4,2]   [8]

Values are packed in blocks of 32 along the packed dimension. A plane of width ``w`` stores the block's 32
values in ``w`` words, ``32 // w`` values per word, value ``i`` of the word in bits ``[i*w, (i+1)*w)``. The
planes of a block follow each other, lowest bits first, so a block of a ``b``-bit tensor is ``b`` words.
Example, 3 bits (planar 2+1), one block of 32 codes c0..c31, each c = lo + 4*hi (lo 2 bits, hi 1 bit):

    word 0  | lo15 | lo14 | ... | lo1 | lo0 |     16 x 2 bits (values 0..15)
    word 1  | lo31 | lo30 | ... | lo17 | lo16 |   16 x 2 bits (values 16..31)
    word 2  | hi31 | hi30 | ... | hi1 | hi0 |     32 x 1 bit
            bit 31                        bit 0

Both halves of a word need the same shift: the plane widths divide 16, so value i and value i + PER/2 of a
word (PER = 32 // w values per word) sit at bits i*w and 16 + i*w. One shift and the mask (m | m << 16) put
two codes in the two 16-bit halves, ready for a paired int→half conversion (the kernels use the fp32 form of
the exponent trick: OR into the mantissa of 2**23, reinterpret, one add; see triton_qmm.py).

A layer's weight (N out, K in) is stored as
    qweight  int32 (ceil(K/32) * bits, N)   codes packed along K, column n = output channel n
    scales   fp16  (G, N)                   G = ceil(K / group_size) groups along K
    qzeros   int32 (G, ceil(N/32) * bits)   zero points packed along N (asymmetric specs only)
Padding codes are 0 and padded activations are 0, so padding never changes a result.
"""
from __future__ import annotations

import math

import torch

PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
SUPPORTED_BITS = tuple(sorted(PLANES))
BLOCK = 32          # values per packing block
SCALE_BITS = 16     # scales are stored as fp16 / bf16


def check_bits(bits: int) -> None:
    if bits not in PLANES:
        raise ValueError(f"the packer cannot store {bits}-bit codes: supported widths are {list(SUPPORTED_BITS)}")


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def packed_size_bits(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool) -> int:
    """Exact number of bits the packed layout above uses for one (out, in) weight, padding included."""
    check_bits(bits)
    groups = n_groups(in_features, group_size)
    codes = out_features * math.ceil(in_features / BLOCK) * BLOCK * bits
    scales = groups * out_features * SCALE_BITS
    zeros = 0 if symmetric else groups * math.ceil(out_features / BLOCK) * BLOCK * bits
    return codes + scales + zeros


PACK_ROWS = 1024    # rows packed at a time: the int64 temporaries of a few rows, not of a 70B-size matrix


def pack_last_dim(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., L) integer codes in [0, 2**bits) -> (..., ceil(L/32) * bits) int32 words. Pure torch, ``PACK_ROWS``
    rows (of the flattened leading dimensions) at a time."""
    check_bits(bits)
    *lead, length = codes.shape
    blocks = math.ceil(length / BLOCK)
    flat = codes.reshape(-1, length)
    out = torch.empty(flat.shape[0], blocks * bits, dtype=torch.int32, device=codes.device)
    for r in range(0, flat.shape[0], PACK_ROWS):
        out[r:r + PACK_ROWS] = _pack_rows(flat[r:r + PACK_ROWS], bits, blocks)
    return out.reshape(*lead, blocks * bits)


def _pack_rows(codes: torch.Tensor, bits: int, blocks: int) -> torch.Tensor:
    """(R, L) codes -> (R, blocks * bits) int32 words."""
    rows, length = codes.shape
    c = torch.zeros(rows, blocks * BLOCK, dtype=torch.int64, device=codes.device)
    c[:, :length] = codes.to(torch.int64)
    c = c.view(rows, blocks, BLOCK)
    words, shift = [], 0
    for w in PLANES[bits]:
        plane = (c >> shift) & ((1 << w) - 1)                       # (R, blocks, 32)
        per_word = BLOCK // w
        plane = plane.view(rows, blocks, w, per_word)               # value i of word j = plane[j*per_word + i]
        offsets = torch.arange(per_word, device=codes.device, dtype=torch.int64) * w
        words.append((plane << offsets).sum(-1))                    # (R, blocks, w); disjoint bits: sum == or
        shift += w
    packed = torch.cat(words, dim=-1)                               # (R, blocks, bits)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)   # reinterpret as signed int32
    return packed.reshape(rows, blocks * bits).to(torch.int32)


def unpack_last_dim(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_last_dim`: (..., ceil(L/32) * bits) int32 -> (..., L) int32 codes."""
    check_bits(bits)
    *lead, n_words = packed.shape
    blocks = n_words // bits
    words = packed.to(torch.int64).view(*lead, blocks, bits) & 0xFFFFFFFF
    codes = torch.zeros(*lead, blocks, BLOCK, dtype=torch.int64, device=packed.device)
    start, shift = 0, 0
    for w in PLANES[bits]:
        per_word = BLOCK // w
        offsets = torch.arange(per_word, device=packed.device, dtype=torch.int64) * w
        plane = (words[..., start:start + w, None] >> offsets) & ((1 << w) - 1)   # (..., blocks, w, per_word)
        codes |= plane.reshape(*lead, blocks, BLOCK) << shift
        start += w
        shift += w
    return codes.reshape(*lead, blocks * BLOCK)[..., :length].to(torch.int32)


def pack_weight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes -> qweight (ceil(K/32) * bits, N) int32, packed along K."""
    return pack_last_dim(codes, bits).t().contiguous()


def unpack_weight(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight (ceil(K/32) * bits, N) -> (N, K) int32 codes."""
    return unpack_last_dim(qweight.t().contiguous(), bits, in_features)


def row_tag_bits(out_features: int) -> int:
    """Bits of the width tags of a mixed layer: 4 bits per output row, two rows per byte. The rows' order
    (widths sorted, stable) is recomputed from the tags, so no permutation is stored."""
    return 8 * math.ceil(out_features / 2)


def mixed_size_bits(row_bits, in_features: int, group_size: int, symmetric: bool) -> int:
    """Exact bits of a layer whose output rows have their own widths (``row_bits``, one per row): the rows
    of each width form one segment stored as above, plus the width tags when there is more than one width."""
    counts = torch.bincount(torch.as_tensor(row_bits, dtype=torch.int64).reshape(-1), minlength=9)
    widths = [b for b in range(counts.numel()) if counts[b] > 0]
    total = sum(packed_size_bits(int(counts[b]), in_features, b, group_size, symmetric) for b in widths)
    return total + (row_tag_bits(int(counts.sum())) if len(widths) > 1 else 0)
