import pytest
import torch

from bitalloc import QuantSpec
from bitalloc.quantize import fake_quantize, gptq, rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape", [(16, 128), (8, 200)], ids=["even", "ragged"])
def test_rtn_error_within_half_step(bits, symmetric, shape):
    torch.manual_seed(bits)
    W = torch.randn(shape)
    spec = QuantSpec(bits, 64, symmetric)
    q = rtn(W, spec)
    assert q.codes.min() >= 0 and q.codes.max() < 2**bits
    assert torch.equal(q.scales, q.scales.half().float())                   # fp16-exact, as stored
    step = q.scales.repeat_interleave(64, 1)[:, : shape[1]]
    err = (q.dequantize() - W).abs()
    slack = step if symmetric else step / 2                                 # sym clips the top level
    assert (err <= slack + 1e-6).all()
    assert torch.allclose(fake_quantize(W, spec), q.dequantize())


def test_more_bits_less_error():
    W = torch.randn(64, 256)
    errs = [float((fake_quantize(W, QuantSpec(b)) - W).pow(2).sum()) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3 * errs[0]


@pytest.mark.parametrize("group", [32, 128, -1])
def test_gptq_beats_rtn_on_correlated_inputs(group):
    torch.manual_seed(0)
    n, k = 64, 256
    X = torch.randn(2048, k) @ (torch.randn(k, k) / k**0.5 + torch.eye(k))   # correlated features
    W = torch.randn(n, k)
    H = X.T @ X
    spec = QuantSpec(3, group)
    q = gptq(W, H, spec)
    assert q.codes.min() >= 0 and q.codes.max() < 8
    out_err = lambda Wq: float(((Wq - W) @ X.T).pow(2).sum())
    assert out_err(q.dequantize()) < 0.8 * out_err(rtn(W, spec).dequantize())


@pytest.mark.parametrize("spec", [QuantSpec(3), QuantSpec(4, 64, True), QuantSpec(2, -1)])
def test_fake_quantize_in_row_chunks_equals_whole(spec):
    from bitalloc.quantize import fake_quantize, rtn
    W = torch.randn(301, 200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(W, spec, rows=64), rtn(W, spec).dequantize())
