"""Each probe against a case whose answer is known exactly or in expectation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitalloc import QuantSpec
from bitalloc.quantize import fake_quantize
from bitalloc.sensitivity import get_probe
from bitalloc.sensitivity.fisher import empirical_fisher
from bitalloc.sensitivity.hessian_trace import hutchinson_traces
from bitalloc.units import Unit

OPTIONS = [QuantSpec(2, 32), QuantSpec(4, 32)]


class RegressionWorkload:
    """y = W x with targets t = W* x + ε, ε ~ N(0, σ²); a "batch" is a tensor of sample indices."""

    def __init__(self, n=4000, d_in=32, d_out=8, sigma=1.0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.scales = torch.linspace(0.5, 2.0, d_in)
        self.X = torch.randn(n, d_in, generator=g) * self.scales
        self.model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
        with torch.no_grad():
            self.model[0].weight.copy_(torch.randn(d_out, d_in, generator=g))
        self.T = self.X @ self.model[0].weight.detach().T + sigma * torch.randn(n, d_out, generator=g)
        self.sigma, self.n = sigma, n

    def batches(self):
        for i in range(0, self.n, 500):
            yield torch.arange(i, min(i + 500, self.n))

    def n_batches(self):
        return -(-self.n // 500)

    def logits(self, idx):
        return self.model(self.X[idx])

    def loss(self, idx):   # ½ Σ ‖y − t‖², summed over the batch (Gaussian NLL up to a constant)
        return 0.5 * (self.logits(idx) - self.T[idx]).pow(2).sum()

    @staticmethod
    def divergence(ref, out):
        return 0.5 * (ref - out).pow(2).sum(-1).mean()


UNIT = [Unit("0", (8, 32))]


def test_hutchinson_exact_on_diagonal_and_close_on_dense():
    torch.manual_seed(0)
    a = torch.rand(10) + 0.1
    A = torch.randn(6, 6)
    A = A @ A.T / 6 + torch.eye(6)
    p1, p2 = torch.randn(10, requires_grad=True), torch.randn(2, 3, requires_grad=True)

    def loss(_):
        return 0.5 * (a * p1 * p1).sum() + 0.5 * p2.reshape(-1) @ A @ p2.reshape(-1)

    mean, stderr, iters = hutchinson_traces(loss, [p1, p2], [None], tol=1e-4, min_iters=500, max_iters=500)
    assert float(mean[0]) == pytest.approx(float(a.sum()), rel=1e-6)        # diagonal: every sample exact
    assert float(mean[1]) == pytest.approx(float(A.trace()), abs=4 * float(stderr[1]))
    assert iters == 500 and float(stderr[0]) < 1e-6


def test_fisher_of_linear_gaussian_model():
    wl = RegressionWorkload(n=3000, sigma=0.5)
    F, steps = empirical_fisher(wl, UNIT, micro_batch=1, max_windows=3000)
    expected = 0.25 * wl.scales**2                        # F_ij = σ² E[x_j²], the same for every output row
    assert steps == 3000
    assert torch.allclose(F["0"].mean(0), expected, rtol=0.1)


def test_output_error_equals_direct_output_error():
    wl = RegressionWorkload(n=1000)
    table = get_probe("output_error").measure(wl, UNIT, OPTIONS)
    W = wl.model[0].weight.detach()
    for j, spec in enumerate(OPTIONS):
        dW = fake_quantize(W, spec) - W
        direct = float((wl.X @ dW.T).double().pow(2).sum()) / wl.X.shape[0]
        assert float(table.cost[0, j]) == pytest.approx(direct, rel=1e-4)


def test_kfac_matches_second_order_loss_change_of_regression():
    wl = RegressionWorkload(n=4000, sigma=1.0)             # unit-variance Gaussian: Fisher = Hessian = I on y
    table = get_probe("kfac", micro_batch=500).measure(wl, UNIT, OPTIONS)
    W = wl.model[0].weight.detach()
    for j, spec in enumerate(OPTIONS):
        dW = fake_quantize(W, spec) - W
        exact = 0.5 * float((wl.X @ dW.T).double().pow(2).sum())
        assert float(table.cost[0, j]) == pytest.approx(exact, rel=0.1)


def test_fisher_probe_orders_widths():
    wl = RegressionWorkload(n=500)
    table = get_probe("fisher", micro_batch=10).measure(wl, UNIT, OPTIONS)
    assert float(table.cost[0, 0]) > float(table.cost[0, 1]) > 0


def test_measured_kl_matches_direct_measurement_on_tiny_llama(tiny_llama_dir, calib_text):
    from bitalloc import api
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, seq_len=32, n_windows=4,
                           options=[QuantSpec(2, 32), QuantSpec(8, 32)])
    units = prepared.units[:3]
    table = get_probe("measured_kl", n_windows=4).measure(prepared.workload, units, prepared.options)
    assert (table.cost[:, 0] > table.cost[:, 1]).all() and (table.cost >= 0).all()
    model = prepared.model
    module = dict(model.named_modules())[units[1].name]
    W = module.weight.detach().clone()
    with torch.no_grad():
        ref = model(prepared.tokens).logits
        module.weight.copy_(fake_quantize(W, prepared.options[0]))
        out = model(prepared.tokens).logits
        module.weight.copy_(W)
    ref, out = F.log_softmax(ref.double(), -1), F.log_softmax(out.double(), -1)
    direct = float((ref.exp() * (ref - out)).sum(-1).mean())              # float64: a KL of 1e-7 keeps its digits
    assert float(table.cost[1, 0]) == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("name", ["hessian_trace", "block_similarity", "kfac", "fisher", "output_error"])
def test_every_probe_runs_on_tiny_llama(tiny_llama_dir, calib_text, name):
    from bitalloc import api
    settings = {"max_iters": 4, "min_iters": 2} if name == "hessian_trace" else {}
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, seq_len=32, n_windows=4)
    table = api.measure(prepared, name, settings=settings, cache=False)
    assert table.cost.shape == (len(prepared.units), 4)
    assert (table.cost[:, 0] >= table.cost[:, -1]).all()                # 2 bits never cheaper than 8
    assert table.probe == name


def test_unknown_probe_lists_valid_ones():
    from bitalloc import BitallocError
    with pytest.raises(BitallocError, match="unknown probe 'hawq'.*fisher.*measured_kl"):
        get_probe("hawq")


def test_fisher_group_costs_sum_to_layer_cost():
    from bitalloc.sensitivity.fisher import fisher_cost, group_costs
    F, dW = torch.rand(16, 100), torch.randn(16, 100)
    groups = group_costs(F, dW, 32)
    assert groups.shape == (4,)
    assert float(groups.sum()) == pytest.approx(fisher_cost(F, dW), rel=1e-9)
    assert float(groups[1]) == pytest.approx(0.5 * float((F[:, 32:64].double() * dW[:, 32:64].double() ** 2).sum()))


def test_kfac_prices_a_token_embedding_by_how_often_each_token_is_read(tiny_llama_dir, calib_text):
    """With --size the embedding is a unit like any layer: kfac's row v costs token v's share of the text times
    its gradient-weighted error, so a token the calibration never reads costs nothing."""
    from bitalloc import api
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=2, seq_len=64,
                           include=("model.embed_tokens",))
    emb = next(i for i, u in enumerate(prepared.units) if u.kind == "embedding")
    table = api.measure(prepared, "kfac", cache=False)
    offset = sum(u.shape[0] for u in prepared.units[:emb])
    rows = table.row_cost[offset:offset + prepared.units[emb].shape[0]]
    seen = torch.bincount(prepared.tokens.reshape(-1), minlength=rows.shape[0]) > 0
    assert torch.isfinite(rows).all() and (rows[~seen] == 0).all() and (rows[seen].sum(1) > 0).all()
    assert table.cost[emb, 0] > table.cost[emb, -1] >= 0                 # 2 bits cost more than 8


def test_kfac_prices_a_tied_embedding_as_the_output_head_too(calib_text):
    """Gemma's embedding is also its output head: a token the calibration never reads still scores at every
    position, so its row costs what the head's error does there, and every row costs more than its lookup."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc import api
    from bitalloc.models.loading import load_tokenizer
    from ..conftest import REFLLAMA
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    tables = {}
    for tied in (True, False):
        model = LlamaForCausalLM(config).eval()
        if not tied:                       # the same weights, the head a separate copy the units leave out
            model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        prepared = api.prepare(model, tokenizer=load_tokenizer(REFLLAMA), calibration=calib_text, n_windows=2,
                               seq_len=64, include=("model.embed_tokens",))
        emb = next(i for i, u in enumerate(prepared.units) if u.kind == "embedding")
        offset = sum(u.shape[0] for u in prepared.units[:emb])
        table = api.measure(prepared, "kfac", cache=False)
        tables[tied] = (table.row_cost[offset:offset + prepared.units[emb].shape[0]], prepared.tokens)
        torch.manual_seed(0)
    (rows, tokens), (lookup, _) = tables[True], tables[False]
    seen = torch.bincount(tokens.reshape(-1), minlength=rows.shape[0]) > 0
    assert (lookup[~seen] == 0).all() and (rows[~seen].sum(1) > 0).all()
    assert (rows.sum(1) > lookup.sum(1))[seen].all()


def test_kfac_counts_each_token_once_when_the_loss_runs_the_head_in_chunks(calib_text, monkeypatch):
    """Gemma's 262k vocabulary sends the loss through the chunked head (alloc/models/head.py): the blocks'
    stand-ins re-run the embedding and backward recomputes each chunk. kfac's table must not see either: it
    equals the table of the plain loss, the tied embedding's two roles included."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc import api
    from bitalloc.models import head, workload
    from bitalloc.models.loading import load_tokenizer
    from ..conftest import REFLLAMA
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    prepared = api.prepare(model, tokenizer=load_tokenizer(REFLLAMA), calibration=calib_text, n_windows=2,
                           seq_len=64, include=("model.embed_tokens",))
    plain = api.measure(prepared, "kfac", cache=False)
    monkeypatch.setattr(workload, "LARGE_LOGITS", 0)
    monkeypatch.setattr(head, "LOSS_CHUNK_LOGITS", 8192 * 16)            # 16 positions a chunk
    chunked = api.measure(prepared, "kfac", cache=False)
    # the chunked head reads the T-1 predicted positions, the plain one all T (the last with zero gradient):
    # 1/64 of the head's input statistics apart (a row whose error that last position reads is further off);
    # a token counted twice is 100 % off on every row it reads
    assert torch.allclose(plain.cost, chunked.cost, rtol=2e-2, atol=0)
    off = ~torch.isclose(plain.row_cost, chunked.row_cost, rtol=0.1, atol=1e-12)
    assert off.float().mean() < 0.02


def test_kfac_prices_the_unread_rows_of_a_tied_embedding_on_a_sample(calib_text, monkeypatch):
    """Gemma's 262k rows are priced on an even sample of the rows no calibration token reads (times the
    sampling step): the embedding's cost keeps its value within a few percent; read rows stay exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitalloc import api
    from bitalloc.models.loading import load_tokenizer
    from bitalloc.sensitivity import kfac
    from ..conftest import REFLLAMA
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    prepared = api.prepare(model, tokenizer=load_tokenizer(REFLLAMA), calibration=calib_text, n_windows=2,
                           seq_len=64, include=("model.embed_tokens",))
    emb = next(i for i, u in enumerate(prepared.units) if u.kind == "embedding")
    exact = api.measure(prepared, "kfac", cache=False)
    monkeypatch.setattr(kfac, "EMBEDDING_SAMPLE", 512)                    # every ~15th unread row
    sampled = api.measure(prepared, "kfac", cache=False)
    assert torch.allclose(sampled.cost[emb], exact.cost[emb], rtol=0.1)
    others = [i for i in range(len(prepared.units)) if i != emb]
    assert torch.equal(sampled.cost[others], exact.cost[others])
    start = sum(u.shape[0] for u in prepared.units[:emb])
    read = torch.bincount(prepared.tokens.reshape(-1), minlength=8192) > 0
    assert torch.equal(sampled.row_cost[start:start + 8192][read], exact.row_cost[start:start + 8192][read])
