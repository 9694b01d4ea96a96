"""Block streaming (alloc/models/stream.py, sensitivity/streamed.py) gives the whole-model numbers."""
import pytest
import torch

from bitalloc.models import zoo
from bitalloc.api import prepare
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.sensitivity import get_probe


def _both(prepared):
    whole = get_probe("fisher", stream="off").measure(prepared.workload, prepared.units, prepared.options)
    streamed = get_probe("fisher", stream="on").measure(prepared.workload, prepared.units, prepared.options)
    assert whole.meta["streamed"] is False and streamed.meta["streamed"] is True
    return whole.cost, streamed.cost


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
def test_streamed_fisher_equals_whole_model_on_refllama(dtype):
    prepared = prepare(None, n_windows=2, seq_len=64, dtype=dtype)    # 128 gradient samples: the equality, not the table, is tested
    whole, streamed = _both(prepared)
    assert (whole > 0).all()
    assert ((whole - streamed).abs() / whole).max() <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "gpt2", "gemma3", "qwen3_moe", "gpt_oss"])
def test_streamed_fisher_equals_whole_model_on_the_zoo(family):
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(0))
    prepared = prepare(zoo.tiny(family), calibration=tokens)
    whole, streamed = _both(prepared)
    assert (whole > 0).all()
    assert ((whole - streamed).abs() / whole).max() <= 1e-4


def test_streamed_fisher_with_micro_batches_and_lm_head():
    tokens = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(1))
    prepared = prepare(zoo.tiny("llama3"), calibration=tokens, include=("lm_head",))
    settings = dict(micro_batch=2, max_windows=3)
    whole = get_probe("fisher", stream="off", **settings).measure(prepared.workload, prepared.units, prepared.options)
    streamed = get_probe("fisher", stream="on", **settings).measure(prepared.workload, prepared.units,
                                                                    prepared.options)
    assert whole.meta["gradient_samples"] == streamed.meta["gradient_samples"] == 2
    assert ((whole.cost - streamed.cost).abs() / whole.cost).max() <= 1e-4


def test_streaming_is_chosen_by_size_and_refuses_embeddings(monkeypatch):
    from bitalloc.sensitivity import base
    tokens = torch.randint(0, 8192, (2, 16))
    prepared = prepare(zoo.tiny("llama3"), calibration=tokens)
    probe = get_probe("fisher")
    assert not base.streams(prepared.workload, prepared.units, "auto")       # tiny: the whole-model path
    unit_params = sum(u.numel for u in prepared.units)
    monkeypatch.setattr(base, "STREAM_ABOVE_BYTES", 8 * unit_params - 1)     # fp32 F + fp32 gradients
    assert base.streams(prepared.workload, prepared.units, "auto")
    assert get_probe("fisher", stream="on").settings() == probe.settings()      # one cache entry for both
    with_embedding = prepare(zoo.tiny("llama3"), calibration=tokens, include=("model.embed_tokens",))
    with pytest.raises(BitallocError, match="embedding units.*--stream off"):
        get_probe("fisher", stream="on").measure(with_embedding.workload, with_embedding.units,
                                                 with_embedding.options)
    for name in ("fisher", "kfac", "output_error"):
        with pytest.raises(BitallocError, match="unknown --stream"):
            get_probe(name, stream="sometimes")


def test_streamed_output_error_equals_whole_model():
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(3))
    prepared = prepare(zoo.tiny("gemma3"), calibration=tokens, include=("lm_head",))
    whole = get_probe("output_error", stream="off").measure(prepared.workload, prepared.units, prepared.options)
    streamed = get_probe("output_error", stream="on").measure(prepared.workload, prepared.units, prepared.options)
    assert streamed.meta["streamed"] is True and (whole.cost > 0).all()
    assert ((whole.cost - streamed.cost).abs() / whole.cost).max() <= 1e-6


@pytest.mark.parametrize("family", ["llama3", "gemma3"])
def test_streamed_kfac_equals_whole_model(family):
    tokens = torch.randint(0, 8192, (5, 32), generator=torch.Generator().manual_seed(5))
    include = ("lm_head",) if family == "llama3" else ()          # gemma3's head is tied: not streamed
    prepared = prepare(zoo.tiny(family), calibration=tokens, include=include)
    whole = get_probe("kfac", stream="off").measure(prepared.workload, prepared.units, prepared.options)
    streamed = get_probe("kfac", stream="on").measure(prepared.workload, prepared.units, prepared.options)
    assert streamed.meta["streamed"] is True and streamed.meta["n_tokens"] == whole.meta["n_tokens"] == 160
    assert (whole.cost > 0).all()
    assert ((whole.cost - streamed.cost).abs() / whole.cost).max() <= 1e-4


@pytest.mark.parametrize("family", ["llama3", "gpt2"])
def test_streamed_block_similarity_equals_whole_model(family):
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(19))
    prepared = prepare(zoo.tiny(family), calibration=tokens)
    whole = get_probe("block_similarity", stream="off").measure(prepared.workload, prepared.units, prepared.options)
    streamed = get_probe("block_similarity", stream="on").measure(prepared.workload, prepared.units,
                                                                  prepared.options)
    assert streamed.meta["streamed"] is True and "streamed" not in whole.meta
    assert whole.meta["importance"].keys() == streamed.meta["importance"].keys()
    for name, value in whole.meta["importance"].items():
        assert value > 0 and streamed.meta["importance"][name] == pytest.approx(value, rel=1e-5)
    assert ((whole.cost - streamed.cost).abs() / whole.cost).max() <= 1e-5


def test_streamed_hessian_trace_is_the_documented_block_local_estimate():
    """Streamed hessian_trace = Tr(empirical Fisher)/n · ‖Q(W) − W‖², keyed apart from Hutchinson's table."""
    from bitalloc.quantize import fake_quantize
    from bitalloc.sensitivity.fisher import empirical_fisher
    from bitalloc.sensitivity.base import modules_by_name
    from bitalloc.units import unit_weight
    tokens = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(7))
    prepared = prepare(zoo.tiny("llama3"), calibration=tokens, include=("lm_head",))
    streamed = get_probe("hessian_trace", stream="on").measure(prepared.workload, prepared.units, prepared.options)
    assert streamed.meta["estimator"] == "fisher trace (block-local)" and streamed.meta["streamed"] is True
    F, _ = empirical_fisher(prepared.workload, prepared.units)
    modules = modules_by_name(prepared.model, prepared.units)
    for i, u in enumerate(prepared.units):
        W = unit_weight(modules, u).detach().float()
        trace = float(F[u.name].double().sum()) / u.numel
        expect = [trace * float((fake_quantize(W, o) - W).double().pow(2).sum()) for o in prepared.options]
        assert torch.allclose(streamed.cost[i], torch.tensor(expect, dtype=torch.float64), rtol=1e-4)
    on, off = get_probe("hessian_trace", stream="on"), get_probe("hessian_trace", stream="off")
    assert on.settings() != off.settings()                   # two estimators, two cache entries


def test_boundary_activations_that_do_not_fit_say_how_many_windows_do(monkeypatch):
    from bitalloc.sensitivity import streamed as fisher_streamed
    tokens = torch.randint(0, 8192, (6, 32))
    prepared = prepare(zoo.tiny("llama3"), calibration=tokens)
    per_window = (2 + 2) * 32 * 64 * 4                                  # (blocks + 2) × seq × hidden × fp32
    monkeypatch.setattr(fisher_streamed, "available_host_bytes", lambda: int(3 * per_window / 0.8))
    with pytest.raises(BitallocError, match=r"6 windows .* 3 windows of 32 tokens fit; pass --n-windows 3"):
        get_probe("fisher", stream="on").measure(prepared.workload, prepared.units, prepared.options)


def test_on_device_puts_the_host_tensors_back_unchanged():
    from bitalloc.models.stream import on_device
    p = torch.nn.Parameter(torch.randn(4, 4))
    ptr = p.data_ptr()
    values = p.detach().clone()
    with on_device([p], torch.device("cpu")):
        assert p.device.type == "cpu" and p.data_ptr() == ptr       # already there: nothing moves
    assert p.data_ptr() == ptr and torch.equal(p, values)   # (the move itself: the GPU test below)


def test_streaming_with_a_separate_compute_device_equals_whole_model():
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(2))
    prepared = prepare(zoo.tiny("qwen3_moe"), calibration=tokens)
    whole = get_probe("fisher", stream="off").measure(prepared.workload, prepared.units, prepared.options)
    prepared.compute_device = "cpu"          # the host-weights path (on a GPU machine: "cuda")
    streamed = get_probe("fisher").measure(prepared.workload, prepared.units, prepared.options)
    assert streamed.meta["streamed"] is True
    assert ((whole.cost - streamed.cost).abs() / whole.cost).max() <= 1e-4
    with pytest.raises(BitallocError, match="--stream off needs the whole model"):
        get_probe("fisher", stream="off").measure(prepared.workload, prepared.units, prepared.options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_blocks_stream_to_the_gpu_with_weights_on_the_host():
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(2))
    prepared = prepare(zoo.tiny("llama3"), calibration=tokens)
    whole = get_probe("fisher", stream="off").measure(prepared.workload, prepared.units, prepared.options)
    prepared.compute_device = "cuda"
    streamed = get_probe("fisher").measure(prepared.workload, prepared.units, prepared.options)
    assert next(prepared.model.parameters()).device.type == "cpu"
    assert ((whole.cost - streamed.cost).abs() / whole.cost).max() <= 1e-3
    kl_cpu = get_probe("measured_kl", n_windows=3, stream="on")
    prepared.compute_device = None
    host = kl_cpu.measure(prepared.workload, prepared.units, prepared.options)
    prepared.compute_device = "cuda"
    device = kl_cpu.measure(prepared.workload, prepared.units, prepared.options)
    assert ((host.cost - device.cost).abs() <= 1e-3 * host.cost + 1e-7).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gptq_on_the_gpu_with_weights_on_the_host():
    import copy

    from bitalloc.api import measure, solve
    from bitalloc.quantize_model import quantize_model
    tokens = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(17))
    prepared = prepare(zoo.tiny("mixtral"), calibration=tokens)
    plan = solve(measure(prepared, "fisher", cache=False), 3.25, "ilp")
    on_gpu = copy.deepcopy(prepared.model)
    host, device = {}, {}
    quantize_model(prepared.model, prepared.units, plan, quantizer="gptq", calibration=tokens, progress=False,
                   sink=lambda n, q: host.__setitem__(n, q.codes))
    quantize_model(on_gpu, prepared.units, plan, quantizer="gptq", calibration=tokens, progress=False,
                   sink=lambda n, q: device.__setitem__(n, q.codes), compute_device="cuda")
    assert all(p.device.type == "cpu" for p in on_gpu.parameters())
    assert host.keys() == device.keys()
    same = sum(int((host[n] == device[n]).sum()) for n in host) / sum(host[n].numel() for n in host)
    assert same > 0.99                        # GPU arithmetic may flip a rounding here and there


def _whole_scores(prepared, tokens, plan, quantizer="rtn"):
    from bitalloc.evaluate import Evaluator
    from bitalloc.quantize_model import quantize_model, set_unit_weights, unit_weights
    evaluator = Evaluator(prepared.model, prepared.kind, prepared.units, tokens, progress=False)
    quantize_model(prepared.model, prepared.units, plan, progress=False, sink=lambda name, q: None,
                   quantizer=quantizer, calibration=prepared.tokens)
    weights = unit_weights(prepared.model, prepared.units)
    set_unit_weights(prepared.model, prepared.units, evaluator.fp_weights)
    return evaluator.fp, evaluator.score(weights)


@pytest.mark.parametrize("model,quantizer", [("refllama-s", "rtn"), ("qwen3_moe", "rtn"), ("gpt2", "rtn"),
                                             ("refllama-s", "gptq"), ("qwen3_moe", "gptq")])
def test_streamed_evaluation_equals_whole_model(model, quantizer):
    import random

    from bitalloc.evaluate import streamed_scores
    from bitalloc.options import QuantSpec
    from bitalloc.plan import BitPlan
    if model == "refllama-s":
        prepared = prepare(None, n_windows=1, seq_len=64)
        tokens = torch.randint(0, 8192, (3, 128), generator=torch.Generator().manual_seed(4))
    else:
        tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(4))
        prepared = prepare(zoo.tiny(model), calibration=tokens, include=("lm_head",))
    rng = random.Random(1)
    plan = BitPlan(layers={u.name: QuantSpec(rng.choice([2, 3, 4, 8, 16])) for u in prepared.units},
                   shapes={u.name: u.shape for u in prepared.units})
    before = {n: p.clone() for n, p in prepared.model.state_dict().items()}
    fp_s, plan_s = streamed_scores(prepared.model, prepared.units, tokens, plan, progress=False,
                                   quantizer=quantizer, calibration=prepared.tokens)
    assert all(torch.equal(before[n], p) for n, p in prepared.model.state_dict().items())     # weights restored
    fp_w, plan_w = _whole_scores(prepared, tokens, plan, quantizer)
    assert abs(fp_s.ppl / fp_w.ppl - 1) <= 1e-5 and abs(plan_s.ppl / plan_w.ppl - 1) <= 1e-5
    assert plan_s.kl == pytest.approx(plan_w.kl, rel=1e-4) and plan_s.kl > 0


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_cli_eval_streamed_prints_the_same_scores(quantizer, tmp_path, capsys):
    from bitalloc.options import QuantSpec
    from bitalloc.plan import BitPlan
    from bitalloc.units import find_units
    from bitalloc.models.loading import load_model
    model, _, _ = load_model(None)
    units = find_units(model)
    BitPlan(layers={u.name: QuantSpec(3) for u in units}, shapes={u.name: u.shape for u in units}).save(
        tmp_path / "plan.json")
    text = tmp_path / "eval.txt"
    from bitalloc.calibration import default_text
    text.write_text(default_text()[:20000])
    outputs = []
    for mode in ("off", "on"):
        assert main(["eval", "--plan", str(tmp_path / "plan.json"), "--text", str(text), "--eval-windows", "2",
                     "--seq-len", "128", "--n-windows", "1", "--stream", mode, "--quantizer", quantizer]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "plan" in outputs[0]


def test_a_tied_lm_head_is_measured_on_the_whole_model_path():
    tokens = torch.randint(0, 8192, (2, 16))
    prepared = prepare(zoo.tiny("gpt2"), calibration=tokens, include=("lm_head",))     # lm_head is wte
    from bitalloc.sensitivity import base
    assert not base.streams(prepared.workload, prepared.units, "auto")
    with pytest.raises(BitallocError, match="tied to the embeddings"):
        get_probe("fisher", stream="on").measure(prepared.workload, prepared.units, prepared.options)


def _measured_kl_both(prepared, n_windows):
    whole = get_probe("measured_kl", n_windows=n_windows, stream="off").measure(prepared.workload, prepared.units,
                                                                                 prepared.options)
    streamed = get_probe("measured_kl", n_windows=n_windows, stream="on").measure(prepared.workload, prepared.units,
                                                                                   prepared.options)
    assert streamed.meta["streamed"] is True and "streamed" not in whole.meta
    assert whole.meta["n_windows"] == streamed.meta["n_windows"] == n_windows
    return whole.cost, streamed.cost


def test_streamed_measured_kl_equals_whole_model_on_refllama():
    prepared = prepare(None, n_windows=5, seq_len=64, include=("lm_head",))
    whole, streamed = _measured_kl_both(prepared, 5)                 # batches of 4 and 1 windows
    assert (whole > 0).all()
    assert ((whole - streamed).abs() / whole).max() <= 1e-4


@pytest.mark.parametrize("family", ["mixtral", "gemma3"])
def test_streamed_measured_kl_equals_whole_model_on_the_zoo_in_small_groups(family, monkeypatch):
    from bitalloc.sensitivity import measured_kl
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(11))
    include = ("model.embed_tokens",) if family == "gemma3" else ()       # an embedding unit: before the blocks
    prepared = prepare(zoo.tiny(family), calibration=tokens, include=include)
    monkeypatch.setattr(measured_kl, "STATE_BYTES", 5 * 3 * 32 * 64 * 4)  # groups of 5 perturbed states
    whole, streamed = _measured_kl_both(prepared, 3)
    assert (whole > 0).float().mean() > 0.9           # experts no token reaches cost nothing, on both paths
    assert ((whole - streamed).abs() <= 1e-4 * whole + 1e-10).all()


def test_streaming_refuses_encoders_in_one_line():
    from bitalloc.models.workload import EncoderWorkload
    workload = EncoderWorkload(zoo.tiny("llama3"), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(BitallocError, match="causal LMs only.*--stream off"):
        workload.stream([])


@pytest.mark.parametrize("family", ["llama3", "mixtral"])
def test_gptq_with_weights_on_the_host_keeps_what_the_device_computed(family, monkeypatch):
    """GPTQ with a compute device: blocks are staged as copies (as on a GPU) and the quantized weights must
    come back to the host; codes and weights equal the in-place run."""
    import copy
    import functools

    from bitalloc import quantize_model as qm
    from bitalloc.api import measure, solve
    from bitalloc.models.stream import BlockStream
    tokens = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(13))
    prepared = prepare(zoo.tiny(family), calibration=tokens, include=("lm_head",) if family == "llama3" else ())
    plan = solve(measure(prepared, "fisher", cache=False), 3.25, "ilp")
    staged_model = copy.deepcopy(prepared.model)
    codes, staged = {}, {}
    qm.quantize_model(prepared.model, prepared.units, plan, quantizer="gptq", calibration=tokens, progress=False,
                      sink=lambda n, q: codes.__setitem__(n, q.codes))
    monkeypatch.setattr(qm, "BlockStream", functools.partial(BlockStream, copy=True))
    qm.quantize_model(staged_model, prepared.units, plan, quantizer="gptq", calibration=tokens, progress=False,
                      sink=lambda n, q: staged.__setitem__(n, q.codes), compute_device="cpu")
    assert codes.keys() == staged.keys() and len(codes) == len(prepared.units)
    assert all(torch.equal(codes[n], staged[n]) for n in codes)
    for (name, a), b in zip(prepared.model.state_dict().items(), staged_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["llama3", "mixtral"])
def test_streamed_kl_fitness_equals_the_whole_model_one(family):
    from bitalloc.fitness import KLFitness, StreamedKLFitness
    tokens = torch.randint(0, 8192, (5, 32), generator=torch.Generator().manual_seed(23))
    prepared = prepare(zoo.tiny(family), calibration=tokens, include=("lm_head",) if family == "llama3" else ())
    prepared.workload.batch_size = 2
    before = {n: p.clone() for n, p in prepared.model.state_dict().items()}
    streamed = StreamedKLFitness(prepared, max_windows=4)
    whole = KLFitness(prepared, max_windows=4)
    gen = torch.Generator().manual_seed(0)
    for n_windows in (None, 3, 1):
        choice = torch.randint(0, len(prepared.options), (len(prepared.units),), generator=gen)
        b = streamed(choice, n_windows)
        a = whole(choice, n_windows)
        whole.restore()                  # the whole-model fitness leaves its plan loaded until restored
        assert a > 0 and b == pytest.approx(a, rel=1e-6)
    assert all(torch.equal(before[n], p) for n, p in prepared.model.state_dict().items())   # weights restored
    assert streamed.evaluations == 3


def test_the_search_solvers_stream_their_fitness_for_large_models(monkeypatch):
    from bitalloc import fitness
    from bitalloc.api import with_fitness
    from bitalloc.sensitivity import base
    tokens = torch.randint(0, 8192, (2, 16))
    prepared = prepare(zoo.tiny("llama3"), calibration=tokens)
    assert type(with_fitness(prepared, "evolutionary", {})["fitness"]) is fitness.KLFitness
    monkeypatch.setattr(base, "STREAM_ABOVE_BYTES", 1000)
    assert type(with_fitness(prepared, "evolutionary", {})["fitness"]) is fitness.StreamedKLFitness


@pytest.mark.parametrize("family,overrides", [
    ("gemma3", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    ("gpt_oss", dict(sliding_window=4)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                   layer_types=["full_attention", "sliding_attention"])),
])
def test_blocks_get_their_own_arguments(family, overrides):
    """Families whose layer types take other masks and rotary tables (Gemma-3's sliding-window and global
    layers) are run block by block with each block's own arguments: the streamed logits are the model's."""
    from bitalloc.evaluate import final_states
    from bitalloc.models.stream import BlockStream
    from bitalloc.units import find_units
    model = zoo.tiny(family, **overrides)
    tokens = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(2))
    stream = BlockStream(model, find_units(model))
    with torch.no_grad():
        expected = model(input_ids=tokens, use_cache=False).logits
        streamed = stream.logits(final_states(stream, tokens), tokens)
        first_only = stream.inputs(tokens)[1][:1] * len(stream.blocks)       # what streaming used to pass
        h = stream.inputs(tokens)[0]
        for i in range(len(stream.blocks)):
            h = stream.run_block(i, h, first_only)
        wrong = stream.logits(h, tokens)
    assert torch.allclose(streamed, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(wrong, expected, atol=1e-3, rtol=0)        # the test can tell the difference


def test_streamed_fisher_in_window_groups_equals_one_group(monkeypatch):
    from bitalloc.sensitivity import streamed
    tokens = torch.randint(0, 8192, (5, 32), generator=torch.Generator().manual_seed(7))
    prepared = prepare(zoo.tiny("gemma3", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
                       calibration=tokens)
    one = get_probe("fisher", stream="on").measure(prepared.workload, prepared.units, prepared.options)
    monkeypatch.setattr(streamed, "GROUP_BYTES", 1)                # one window per group
    grouped = get_probe("fisher", stream="on").measure(prepared.workload, prepared.units, prepared.options)
    assert ((one.cost - grouped.cost).abs() / one.cost).max() <= 1e-6       # float32 F summed in another order
    assert torch.allclose(one.row_cost, grouped.row_cost, rtol=1e-6, atol=0)
