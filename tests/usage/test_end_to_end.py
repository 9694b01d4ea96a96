"""The spine on the real embedded model: allocate through the API, quantize with RTN and GPTQ, evaluate."""
import pytest
import torch

from bitalloc import allocate, api
from bitalloc.evaluate import Evaluator
from bitalloc.quantize_model import quantize_model, set_unit_weights, unit_weights

from ..conftest import REFLLAMA


@pytest.fixture(scope="module")
def prepared():
    return api.prepare(REFLLAMA, seq_len=128, n_windows=8)


@pytest.mark.slow
def test_allocate_on_refllama(prepared):
    plan = allocate(prepared.model, 3.2, calibration=prepared.tokens, probe="fisher")
    assert plan.true_bpw <= 3.2 and len(plan.layers) == 56
    assert plan.model["architecture"] == "LlamaForCausalLM" and plan.probe == "fisher"
    assert len({s.bits for s in plan.layers.values()}) > 1                   # actually mixed


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_quantized_model_is_worse_than_fp_but_sane(prepared, quantizer):
    table = api.measure(prepared, "output_error")
    plan = api.solve(table, 3.25, "ilp")
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, prepared.tokens[:2], progress=False)
    quantize_model(prepared.model, prepared.units, plan, quantizer=quantizer, calibration=prepared.tokens[:4])
    weights = unit_weights(prepared.model, prepared.units)
    set_unit_weights(prepared.model, prepared.units, ev.fp_weights)
    s = ev.score(weights)
    # On 2 windows the quantized perplexity can land on either side of fp; the KL to fp cannot be zero.
    assert 0.5 * ev.fp.ppl < s.ppl < 2 * ev.fp.ppl and 0 < s.kl < 1
    name = prepared.units[0].name
    assert torch.equal(unit_weights(prepared.model, prepared.units)[name], ev.fp_weights[name])   # fp restored


@pytest.mark.slow
def test_table_cache_is_reused(prepared):
    first = api.measure(prepared, "output_error")
    second = api.measure(prepared, "output_error")
    assert "cached" in second.meta and torch.equal(first.cost, second.cost)
