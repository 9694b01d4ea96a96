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
    assert torch.allclose(fake_quantize(W, spec, grid=(1.0,)), q.dequantize())     # plain min/max RTN


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
    from bitalloc.quantize import CLIP_GRID, fake_quantize, rtn
    W = torch.randn(301, 200, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fake_quantize(W, spec, rows=64), rtn(W, spec, grid=CLIP_GRID).dequantize())


@pytest.mark.parametrize("spec", [QuantSpec(2), QuantSpec(3, 64), QuantSpec(4, 32, True)], ids=lambda s: s.label())
def test_clipping_search_never_rounds_a_group_worse(spec):
    from bitalloc.quantize import CLIP_GRID, _group_view
    W = torch.randn(48, 200, generator=torch.Generator().manual_seed(3)) ** 3      # heavy tails: clipping pays
    h = torch.rand(200, generator=torch.Generator().manual_seed(4)) + 0.1
    group_err = lambda q: _group_view(((q.dequantize() - W) ** 2) * h, spec.group_size, 0.0).sum(-1)
    plain, searched = rtn(W, spec), rtn(W, spec, importance=h, grid=CLIP_GRID)
    assert (group_err(searched) <= group_err(plain) + 1e-6).all()
    assert group_err(searched).sum() < 0.95 * group_err(plain).sum()
    assert searched.codes.min() >= 0 and searched.codes.max() < 2**spec.bits


def test_gptq_act_order_keeps_contiguous_groups_fixed_from_the_original_weights():
    from bitalloc.quantize import group_params
    torch.manual_seed(1)
    X = (torch.randn(1024, 256) @ (torch.randn(256, 256) / 16 + torch.eye(256))) * torch.linspace(0.1, 3, 256)
    W, H, spec = torch.randn(32, 256), X.T @ X, QuantSpec(3, 64)
    q = gptq(W, H, spec, act_order=True)
    scale, zero = group_params(W, spec)                                      # static groups: from W itself
    assert torch.equal(q.scales, scale) and torch.equal(q.zeros, zero)
    out_err = lambda Wq: float(((Wq - W) @ X.T).pow(2).sum())
    assert out_err(q.dequantize()) < 0.8 * out_err(rtn(W, spec).dequantize())


def test_sequential_gptq_groups_follow_the_forward_pass(tiny_llama_dir):
    from bitalloc.models.loading import load_model
    from bitalloc.quantize_model import _collect, _sequential_groups
    from bitalloc.units import find_units
    model, _, _ = load_model(tiny_llama_dir)
    units = [u for u in find_units(model) if ".layers.0." in u.name]
    order = {}
    _collect(dict(model.named_modules()), units, lambda: model(input_ids=torch.ones(1, 8, dtype=torch.long)),
             {}, order)
    names = [[u.name.rsplit(".", 1)[-1] for u in g] for g in _sequential_groups(units, order)]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def _correlated_gram(in_f: int, dead: int = 3) -> torch.Tensor:
    """XᵀX / n of inputs that share a few directions, with an outlier channel and ``dead`` inputs never firing."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4096, 16, generator=g) @ torch.randn(16, in_f, generator=g) + 0.1 * torch.randn(4096, in_f, generator=g)
    X[:, :dead] = 0
    X[:, dead] *= 20
    return X.T @ X / len(X)


@pytest.mark.parametrize("spec", [QuantSpec(bits=2, group_size=32), QuantSpec(bits=4, group_size=32),
                                  QuantSpec(bits=3, group_size=-1, symmetric=True)])
def test_gptq_error_rows_from_its_sweep_equal_the_product(spec):
    """The probes price GPTQ's ΔW by the sweep's own losses (ΔW H ΔWᵀ = E Eᵀ on the damped H, damping taken
    back out) instead of the out × in² product: the two agree row by row, dead inputs included."""
    from bitalloc.quantize import DEFAULTS
    q = DEFAULTS["gptq"]
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(2))
    H = _correlated_gram(96).double()
    fast = q.error_rows(W, spec, H, q.prepare(H, [spec]))
    dW = (q.fake(W, spec, H) - W).double()
    direct = ((dW @ H) * dW).sum(1)
    assert torch.allclose(fast, direct, rtol=1e-3, atol=1e-9 * float(direct.max()))


def test_gptq_on_a_prepared_hessian_rounds_as_on_the_gram_itself():
    """One ``prepare`` shared by every width of a layer gives each width the codes GPTQ gives from XᵀX."""
    from bitalloc.quantize import DEFAULTS
    q = DEFAULTS["gptq"]
    W = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))
    H = _correlated_gram(64)
    specs = [QuantSpec(bits=b, group_size=32) for b in (2, 3, 4)]
    shared = q.prepare(H, specs)
    for spec in specs:
        assert torch.equal(q.gptq(W, H, spec, hessian=shared).codes, q.gptq(W, H, spec).codes)
