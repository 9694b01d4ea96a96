"""Every family of the local model zoo (alloc/models/zoo.py): units cover every matrix weight of the decoder,
MoE experts are units (per expert or per layer), and apply -> save -> load reproduces the fake-quantized
logits exactly."""
import copy
import random

import pytest
import torch
from torch import nn

from bitalloc import BitallocError
from bitalloc.models import zoo
from bitalloc.options import QuantSpec
from bitalloc.packed import apply, checkpoint_report, load, save
from bitalloc.plan import BitPlan
from bitalloc.quantize_model import quantize_model
from bitalloc.units import EXPERT_KINDS, find_blocks, find_units, uncovered_weights

SPECS = [QuantSpec(2), QuantSpec(3), QuantSpec(4), QuantSpec(8), QuantSpec(16), QuantSpec(3, 32, True)]


def _matrix_params(model, units):
    """Every ≥2-D weight (not a bias) inside the decoder blocks: name -> numel."""
    out = {}
    for block_name, block in find_blocks(model, units):
        for name, p in block.named_parameters():
            if p.dim() >= 2 and not name.endswith("bias"):
                out[f"{block_name}.{name}"] = p.numel()
    return out


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_units_cover_every_decoder_matrix(family):
    model = zoo.tiny(family)
    units = find_units(model)
    assert uncovered_weights(model, units) == []
    weights = _matrix_params(model, units)
    covered = {f"{u.module_name}.{u.param}" for u in units}
    routers = {n for n in weights if n not in covered}
    # what units do not cover are MoE routers only, and dense families have none
    assert all(n.rpartition(".")[0].rpartition(".")[2] in ("gate", "router", "shared_expert_gate") for n in routers)
    assert (family in zoo.MOE_FAMILIES) == bool(routers)
    unit_params = sum(u.numel for u in units)
    assert unit_params == sum(v for n, v in weights.items() if n in covered)


@pytest.mark.parametrize("family", zoo.MOE_FAMILIES)
def test_moe_experts_are_units(family):
    model = zoo.tiny(family)
    per_expert = find_units(model)
    per_layer = find_units(model, experts="per-layer")
    experts = [u for u in per_expert if u.kind in EXPERT_KINDS]
    stacks = [u for u in per_layer if u.kind in EXPERT_KINDS]
    n_experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else model.config.num_experts
    assert len(experts) == n_experts * len(stacks) and experts[0].name.split(".")[-2].isdigit()
    assert sum(u.numel for u in experts) == sum(u.numel for u in stacks)
    # the experts hold most of a MoE model's matrix weights, and a plan's bpw counts them
    dense = sum(u.numel for u in per_expert if u.kind not in EXPERT_KINDS)
    assert sum(u.numel for u in experts) >= dense
    plan = BitPlan(layers={u.name: QuantSpec(2 if u.kind in EXPERT_KINDS else 8) for u in per_expert},
                   shapes={u.name: u.shape for u in per_expert})
    bits = sum(plan.layers[u.name].size_bits(u.shape) for u in per_expert)
    assert plan.true_bpw == pytest.approx(bits / sum(u.numel for u in per_expert))
    assert plan.true_bpw < BitPlan(layers={n: QuantSpec(8) for n in plan.layers}, shapes=plan.shapes).true_bpw - 2


@pytest.mark.parametrize("experts", ["per-expert", "per-layer"])
@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_round_trip_reproduces_fake_quantized_logits(family, experts, tmp_path):
    if experts == "per-layer" and family not in zoo.MOE_FAMILIES:
        pytest.skip("dense family: no experts")
    model = zoo.tiny(family)
    units = find_units(model, experts=experts)
    rng = random.Random(len(family))
    plan = BitPlan(layers={u.name: rng.choice(SPECS) for u in units}, shapes={u.name: u.shape for u in units},
                   budget_bits=16.0)
    fake = copy.deepcopy(model)
    quantize_model(fake, units, plan, progress=False)
    apply(model, plan, progress=False)
    x = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))
    out = save(model, tmp_path / "packed")
    loaded = load(out)
    with torch.no_grad():
        reference = fake(input_ids=x).logits
        assert torch.equal(model(input_ids=x).logits, reference)
        assert torch.equal(loaded(input_ids=x).logits, reference)
    assert abs(checkpoint_report(model, out)["relative_diff"]) < 0.02


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.mix = nn.Parameter(torch.randn(16, 16))       # a matrix weight no unit can hold

    def forward(self, x):
        return self.proj(x) @ self.mix


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_uncovered_matrix_weights_are_named():
    net = _Net()
    with pytest.raises(BitallocError, match=r"2 matrix weight\(s\).*layers\.0\.mix.*--exclude"):
        find_units(net)
    assert [u.name for u in find_units(net, check_coverage=False)] == ["layers.0.proj", "layers.1.proj"]
    assert [u.name for u in find_units(net, exclude=["layers.*.mix"])] == ["layers.0.proj", "layers.1.proj"]


def test_exclude_keeps_weights_out_and_experts_flag_needs_experts():
    model = zoo.tiny("mixtral")
    units = find_units(model, exclude=["model.layers.1.mlp.experts.*"])
    assert not any(u.module_name == "model.layers.1.mlp.experts" for u in units)
    with pytest.raises(BitallocError, match="--exclude 'nothing' matches no unit or weight"):
        find_units(model, exclude=["nothing"])
    with pytest.raises(BitallocError, match="no MoE experts"):
        find_units(zoo.tiny("llama3"), experts="per-layer")


@pytest.mark.parametrize("experts", ["per-expert", "per-layer"])
def test_gptq_sees_each_experts_inputs(experts):
    import warnings
    model = zoo.tiny("mixtral")
    units = find_units(model, experts=experts)
    plan = BitPlan(layers={u.name: QuantSpec(3) for u in units}, shapes={u.name: u.shape for u in units})
    tokens = torch.randint(0, 8192, (4, 64), generator=torch.Generator().manual_seed(0))
    rtn_model, gptq_model = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model(rtn_model, units, plan, quantizer="rtn", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # no expert falls back to RTN
        quantize_model(gptq_model, units, plan, quantizer="gptq", calibration=tokens, progress=False)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits
        err = {name: (m(input_ids=tokens).logits - ref).pow(2).mean() for name, m in
               (("rtn", rtn_model), ("gptq", gptq_model))}
    assert err["gptq"] < 0.8 * err["rtn"]
    experts_module = gptq_model.model.layers[0].mlp.experts
    assert "forward" not in experts_module.__dict__          # the eager forward was only borrowed


@pytest.mark.parametrize("family", list(zoo.FAMILIES))
def test_row_plans_pack_and_reproduce_the_fake_quantized_logits(family):
    """--granularity row on every family: within budget, only nn.Linear units get mixed rows (experts,
    embeddings, GPT-2's Conv1D keep one width), and the packed model equals the fake-quantized one."""
    from bitalloc.api import measure, prepare, solve
    from bitalloc.packed import planned_units
    tokens = torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(0))
    prepared = prepare(zoo.tiny(family), calibration=tokens)
    plan = solve(measure(prepared, "fisher", cache=False), 3.0, "closed_form", granularity="row")
    assert plan.true_bpw <= 3.0
    kinds = {u.name: u.kind for u in prepared.units}
    assert all(kinds[n] == "linear" for n in plan.row_bits)
    fake = copy.deepcopy(prepared.model)
    quantize_model(fake, planned_units(fake, plan), plan, sink=lambda n, q: None, progress=False)
    packed = apply(copy.deepcopy(prepared.model), plan, progress=False)
    with torch.no_grad():
        assert torch.equal(packed(tokens).logits, fake(tokens).logits)


def test_gptq_sees_what_each_transposed_gpt_oss_expert_reads():
    """GPT-OSS multiplies x @ W by (in, out) expert slices: each expert's XᵀX is caught, so GPTQ (not its RTN
    fallback) quantizes them; gate_up's XᵀX equals the routed tokens' own."""
    import warnings

    from bitalloc.api import prepare
    from bitalloc.models.expert_inputs import expert_hessians
    from bitalloc.quantize import rtn
    from bitalloc.units import EXPERT_KINDS, unit_weight
    tokens = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(0))
    prepared = prepare(zoo.tiny("gpt_oss"), calibration=tokens)
    model, modules = prepared.model, dict(prepared.model.named_modules())
    experts = [u for u in prepared.units if u.kind in EXPERT_KINDS]
    mlp = modules["model.layers.0.mlp"]
    seen = {}
    hook = mlp.experts.register_forward_hook(lambda m, args, out: seen.update(x=args[0], idx=args[1]))
    H = {}
    with torch.no_grad(), expert_hessians(modules, experts, H):
        model(input_ids=tokens)
    hook.remove()
    assert set(H) == {u.name for u in experts}
    for e in range(model.config.num_local_experts):
        x = seen["x"][(seen["idx"] == e).any(-1)].float()
        assert torch.allclose(H[f"model.layers.0.mlp.experts.{e}.gate_up_proj"], x.T @ x, rtol=1e-4, atol=1e-4)
    fake = copy.deepcopy(model)
    plan = BitPlan(layers={u.name: QuantSpec(3) for u in prepared.units},
                   shapes={u.name: u.shape for u in prepared.units})
    codes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no "rounds … MoE expert unit(s) to nearest"
        quantize_model(fake, prepared.units, plan, quantizer="gptq", calibration=tokens, progress=False,
                       sink=lambda n, q: codes.__setitem__(n, q.codes))
    W = unit_weight(modules, experts[0]).detach().float()
    assert not torch.equal(codes[experts[0].name], rtn(W, QuantSpec(3)).codes)     # GPTQ, not RTN
