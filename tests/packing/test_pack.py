import pytest
import torch

from bitalloc.kernels.pack import (PLANES, pack_last_dim, pack_weight, packed_size_bits, unpack_last_dim,
                                   unpack_weight)


@pytest.mark.parametrize("bits", sorted(PLANES), ids=lambda b: f"w{b}")
@pytest.mark.parametrize("shape", [(1, 32), (3, 31), (7, 100), (64, 256), (5, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_last_dim(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.int32)
    packed = pack_last_dim(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], -(-shape[1] // 32) * bits)
    assert torch.equal(unpack_last_dim(packed, bits, shape[1]), codes)


@pytest.mark.parametrize("bits", sorted(PLANES), ids=lambda b: f"w{b}")
def test_round_trip_weight_and_size(bits):
    n, k = 48, 200
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.int32)
    q = pack_weight(codes, bits)
    assert q.shape == (7 * bits, n)
    assert torch.equal(unpack_weight(q, bits, k), codes)
    assert packed_size_bits(n, k, bits, 128, True) == q.numel() * 32 + 2 * n * 16


def test_three_bit_layout_is_planar():
    codes = torch.arange(32, dtype=torch.int32).remainder(8)[None]      # one block
    words = pack_last_dim(codes, 3)[0].to(torch.int64) & 0xFFFFFFFF
    lo = sum(((int(c) & 3) << (2 * i)) for i, c in enumerate(codes[0, :16]))
    hi = sum(((int(c) >> 2) & 1) << i for i, c in enumerate(codes[0]))
    assert int(words[0]) == lo and int(words[2]) == hi


def test_unsupported_width():
    with pytest.raises(ValueError, match="cannot store 7-bit"):
        pack_last_dim(torch.zeros(1, 32, dtype=torch.int32), 7)


@pytest.mark.parametrize("bits", sorted(PLANES))
def test_packing_and_rounding_in_row_chunks_change_nothing(bits, monkeypatch):
    from bitalloc.kernels import pack
    from bitalloc import quantize
    from bitalloc.options import QuantSpec
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (10, 70), generator=gen, dtype=torch.int32)
    W = torch.randn(10, 300, generator=gen, dtype=torch.bfloat16)
    whole, q = pack.pack_last_dim(codes, bits), quantize.rtn(W, QuantSpec(bits, 128))
    monkeypatch.setattr(pack, "PACK_ROWS", 3)
    monkeypatch.setattr(quantize, "RTN_ROWS", 3)
    chunked = pack.pack_last_dim(codes, bits)
    assert torch.equal(chunked, whole) and torch.equal(pack.unpack_last_dim(chunked, bits, 70), codes)
    q3 = quantize.rtn(W, QuantSpec(bits, 128))
    assert torch.equal(q3.codes, q.codes) and torch.equal(q3.scales, q.scales) and torch.equal(q3.zeros, q.zeros)
