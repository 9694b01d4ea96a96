"""The LM head a few positions at a time (alloc/models/head.py) gives the full-logits numbers."""
import pytest
import torch
import torch.nn.functional as F

from bitalloc.evaluate import final_states, head_of, window_nll
from bitalloc.models import head as head_module
from bitalloc.models import zoo
from bitalloc.units import find_units


@pytest.fixture
def gemma_like(monkeypatch):
    """A tiny Gemma-3 (sliding and global layers), with chunks of a few positions."""
    monkeypatch.setattr(head_module, "CHUNK_LOGITS", 3 * 8192)       # 3 positions of one window per chunk
    model = zoo.tiny("gemma3", sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    tokens = torch.randint(0, 8192, (2, 20), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_chunked_nll_and_kl_equal_the_full_logits(gemma_like):
    model, tokens = gemma_like
    stream, head = head_of(model, find_units(model))
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits
        h = final_states(stream, tokens)
        other = h + 0.05 * torch.randn_like(h)
        logits_other = stream.logits(other, tokens)
        nll = head.nll(h, tokens)
        nll_q, kl = head.nll_kl(h, other, tokens)
    assert float(nll.sum()) == pytest.approx(window_nll(logits, tokens)[1], rel=1e-5)
    ref, out = F.log_softmax(logits.double(), -1), F.log_softmax(logits_other.double(), -1)
    expected_kl = (ref.exp() * (ref - out)).sum(-1).mean(-1)              # float64: the small KL keeps its digits
    assert torch.allclose(kl, expected_kl, rtol=1e-3, atol=1e-9) and (kl > 0).all()
    assert float(nll_q.sum()) == pytest.approx(window_nll(logits_other, tokens)[1], rel=1e-5)


def test_chunked_loss_has_the_full_gradient(gemma_like):
    model, tokens = gemma_like
    stream, head = head_of(model, find_units(model))
    with torch.no_grad():
        h0 = final_states(stream, tokens)
    h = h0.clone().requires_grad_(True)
    head.loss(h, tokens).backward()
    g_chunked = h.grad.clone()
    h = h0.clone().requires_grad_(True)
    logits = stream.logits(h, tokens).float()[:, :-1]
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).backward()
    assert torch.allclose(g_chunked, h.grad, rtol=1e-4, atol=1e-8)


def test_eager_backward_equals_the_loss_backward(gemma_like):
    """Head.backward (each chunk run backward at once, h's graph once after) gives loss().backward()'s
    gradients, into h and through the graph before it, and returns the mean loss."""
    model, tokens = gemma_like
    stream, head = head_of(model, find_units(model))
    with torch.no_grad():
        h0 = final_states(stream, tokens)
    x = h0.clone().requires_grad_(True)
    loss = head.loss(x * 2, tokens)                          # a graph before h: the gradient must reach x
    (loss * 3.0).backward()
    expected = x.grad.clone()
    x = h0.clone().requires_grad_(True)
    mean = head.backward(x * 2, tokens, scale=3.0)
    assert torch.allclose(x.grad, expected, rtol=1e-4, atol=1e-8)
    assert float(mean) == pytest.approx(float(loss), rel=1e-5)


def test_fused_reductions_equal_eager():
    a = torch.randn(2, 5, 70000, generator=torch.Generator().manual_seed(1)).bfloat16() * 4
    b = a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    lse, kl = head_module.kl_terms(a, b)
    lse_f, kl_f = head_module.fused(head_module.kl_terms)(a, b)
    assert torch.allclose(lse, lse_f, rtol=1e-5) and torch.allclose(kl, kl_f, rtol=1e-3, atol=1e-5)
    ref, out = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    assert torch.allclose(kl.double(), (ref.exp() * (ref - out)).sum(-1), rtol=1e-4, atol=1e-7)


def test_kl_of_far_apart_distributions_is_finite_and_exact():
    """A quantized model that moves all mass onto tokens the reference rules out (the log1p form's argument
    reaches −1) or raises logits far beyond the reference's (exp(−d) past float32): KL and lse stay exact."""
    g = torch.Generator().manual_seed(3)
    a = 3 * torch.randn(4, 3, 5000, generator=g)
    b = a.clone()
    b[0, :, :10] += 120.0                 # mass moved onto tokens of tiny reference probability
    b[1] -= 200 * torch.rand(b[1].shape, generator=g)
    b[2, :, 0] = a[2, :, 0].amax() + 400.0      # one logit far beyond float32's exp range in the log1p form
    for fn in (head_module.kl_terms, head_module.fused(head_module.kl_terms)):
        lse, kl = fn(a, b)
        ref, out = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
        expected = (ref.exp() * (ref - out)).sum(-1)
        assert torch.isfinite(kl).all() and torch.isfinite(lse).all()
        assert torch.allclose(kl.double(), expected, rtol=1e-4, atol=1e-4)
        assert torch.allclose(lse.double(), torch.logsumexp(b.double(), -1), rtol=1e-5)
        assert kl[3].abs().max() < 1e-6                       # identical rows: zero
