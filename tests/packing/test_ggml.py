"""ggml types: what we write is what the ``gguf`` package's own decoder reads, and our quantizer's error
is what its bits should give."""
import numpy as np
import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.ggml import layout
from bitalloc.ggml.types import TYPES, get_type, quantize

gguf = pytest.importorskip("gguf")


def _weights(rows=8, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.02
    W[0, 3] = 0.3                                     # an outlier, as real layers have
    W[1] = W[1].abs()                                 # an all-positive row: mins must still hold it
    W[2, :256] = 0                                    # an all-zero block
    return W


@pytest.mark.parametrize("name", list(TYPES))
def test_the_gguf_decoder_reads_our_blocks_as_we_do(name):
    W = _weights()
    q = quantize(W, name)
    data = layout.pack(q)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    assert data.shape == (8, 512 // TYPES[name].block * TYPES[name].block_bytes)
    assert gguf.GGML_QUANT_SIZES[qtype] == (TYPES[name].block, TYPES[name].block_bytes)
    theirs = gguf.quants.dequantize(data, qtype)
    np.testing.assert_allclose(theirs, q.dequantize().numpy(), rtol=0, atol=1e-7)
    assert np.all(theirs[2, :256] == 0)


def test_error_falls_with_bits_and_importance_weights_the_error():
    W = _weights(rows=64, cols=1024, seed=1)
    errors = {n: float((quantize(W, n).dequantize() - W).square().mean()) for n in
              ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")}
    assert list(errors.values()) == sorted(errors.values(), reverse=True), errors
    h = torch.exp(2 * torch.randn(1024, generator=torch.Generator().manual_seed(3)))   # uneven input energy
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q4_0"):
        plain, weighted = quantize(W, name).dequantize(), quantize(W, name, importance=h).dequantize()
        err = lambda Wq: float(((Wq - W).square() * h).sum())       # noqa: E731  the output error it stands for
        assert err(weighted) < 0.95 * err(plain), name


def test_our_q4_k_beats_plain_rounding_at_the_same_bits():
    """The gguf package's own Q4_0 (plain rounding) against ours, same format, same bytes."""
    W = _weights(rows=64, cols=1024, seed=2)
    ours = quantize(W, "Q4_0").dequantize().numpy()
    theirs = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), gguf.GGMLQuantizationType.Q4_0),
                                    gguf.GGMLQuantizationType.Q4_0)
    assert ((ours - W.numpy()) ** 2).mean() < ((theirs - W.numpy()) ** 2).mean()


def test_a_row_not_a_multiple_of_the_block_is_refused():
    with pytest.raises(BitallocError, match="multiple of 256"):
        quantize(torch.randn(4, 640), "Q4_K")
    with pytest.raises(BitallocError, match="unknown ggml type"):
        get_type("Q7_K")
