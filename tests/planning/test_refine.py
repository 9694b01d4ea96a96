"""The finishing stage (solvers/refine.py, alloc/finish.py): EvoPress search on layer and row plans, and the
row plan's check against the layer plan, on toy fitnesses and on a real small model."""
import pytest
import torch

from bitalloc import QuantSpec, api
from bitalloc.errors import BitallocWarning
from bitalloc.sensitivity.table import SensitivityTable
from bitalloc.solvers.base import Problem
from bitalloc.solvers.refine import Refiner, layer_space, refine, row_space
from bitalloc.solvers.rows import solve_rows
from bitalloc.units import Unit


def table_with_rows(n_units=6, rows=128, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    units = [Unit(f"layer{i}", (rows, cols)) for i in range(n_units)]
    options = [QuantSpec(b) for b in (2, 3, 4, 8)]
    base = torch.rand(n_units * rows, 1, generator=g, dtype=torch.float64) * 10 ** torch.rand(n_units * rows, 1,
                                                                                         generator=g)
    row_cost = base * torch.tensor([2.0 ** (-1.8 * b) for b in (2, 3, 4, 8)], dtype=torch.float64)
    cost = torch.stack([row_cost[i * rows:(i + 1) * rows].sum(0) for i in range(n_units)])
    return SensitivityTable(units, options, cost, {"probe": "toy"}, row_cost)


class RowFitness:
    """What the model would measure where the table is off: layer 0 hurts 30 times what the table says,
    layer 1 a thirtieth (an interaction the additive costs missed), on top of the table's row costs."""

    def __init__(self, table):
        self.table, self.calls = table, 0
        self.weight = torch.ones(len(table.units), dtype=torch.float64)
        self.weight[0], self.weight[1] = 30.0, 1 / 30

    def __call__(self, choice, n_windows=None):
        self.calls += 1
        total = 0.0
        for i, c in enumerate(choice):
            rows = self.table.rows_of(i)
            c = c if isinstance(c, torch.Tensor) and c.dim() == 1 else torch.full((rows.shape[0],), int(c))
            total += float(self.weight[i] * rows.gather(1, c[:, None]).sum())
        return total


@pytest.mark.parametrize("granularity", ["layer", "row"])
def test_refine_never_worse_than_its_seed_and_never_over_budget(granularity):
    table = table_with_rows()
    problem = Problem(table, 3.3)
    seed = solve_rows(problem, "closed_form") if granularity == "row" else api.solve(table, 3.3)
    fitness = RowFitness(table)
    space, start = (row_space if granularity == "row" else layer_space)(problem, seed)
    before = fitness(space.to_units(start))
    out = refine(problem, seed, fitness, seconds=None, generations=40, offspring=6, stages=((1, 2), (1, 1)),
                 progress=False)
    assert out.true_bpw <= 3.3 + 1e-12
    r = out.extra["refine"]
    assert r["seed_kl"] == pytest.approx(before) and r["kl"] <= r["seed_kl"]
    assert r["kl"] < 0.9 * r["seed_kl"]                     # it moved bits to the layer the table undervalued
    if granularity == "row":
        assert out.row_bits and out.extra["granularity"] == "row"
        again = refine(problem, seed, RowFitness(table), seconds=None, generations=40, offspring=6,
                       stages=((1, 2), (1, 1)), progress=False)
        assert all(torch.equal(again.row_bits[n], out.row_bits[n]) for n in out.row_bits)     # same seed, same plan


def test_mutation_keeps_the_budget_and_moves_bits():
    import random
    table = table_with_rows(seed=3)
    problem = Problem(table, 3.0)
    space, start = row_space(problem, solve_rows(problem, "closed_form"))
    refiner = Refiner(lambda c, w: 0.0, seconds=None, generations=1)
    rng = random.Random(0)
    for _ in range(50):
        child = refiner.mutate(space, start, rng)
        assert child is not None and space.used(child) <= space.capacity * (1 + 1e-12)
        assert not torch.equal(child, start)


def test_refine_stops_at_its_time_limit_inside_a_generation():
    """A slow fitness (a large model's GPTQ on first use) must not stretch --refine SECONDS by a generation."""
    import time
    table = table_with_rows()
    problem = Problem(table, 3.3)
    seed = api.solve(table, 3.3)
    inner = RowFitness(table)

    def slow(choice, n_windows=None):
        time.sleep(0.05)
        return inner(choice, n_windows)
    t = time.time()
    out = refine(problem, seed, slow, seconds=0.3, offspring=50, stages=((1, 10), (1, 1)), progress=False)
    assert time.time() - t < 0.3 + 0.2                      # one fitness call past the limit at most
    assert out.extra["refine"]["kl"] <= out.extra["refine"]["seed_kl"]


def test_refine_needs_an_end():
    with pytest.raises(Exception, match="needs an end"):
        Refiner(lambda c, w: 0.0, seconds=None, generations=None)


def test_a_row_plan_that_scores_worse_falls_back_to_the_layer_plan():
    from bitalloc.finish import check_rows
    table = table_with_rows(seed=5)
    row_plan = solve_rows(Problem(table, 3.3), "closed_form")
    assert row_plan.row_bits
    rows_hurt = lambda choice, w: 1.0 if any(isinstance(c, torch.Tensor) and len(c.unique()) > 1 for c in choice) \
        else 0.5                                                                              # noqa: E731
    with pytest.warns(BitallocWarning, match="row plan scores worse"):
        plan = check_rows(table, row_plan, rows_hurt)
    assert not plan.row_bits and plan.extra["fallback"] and plan.extra["row_check"]["row_kl"] == 1.0
    kept = check_rows(table, row_plan, lambda choice, w: 0.1)
    assert kept is row_plan and kept.extra["row_check"]["layer_kl"] == 0.1


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_allocate_refines_on_a_real_model_and_gives_the_model_back(tiny_llama_dir, calib_text, quantizer):
    from bitalloc.models.loading import load_model
    model, tokenizer, _ = load_model(tiny_llama_dir)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    plan = api.allocate(model, 3.3, tokenizer=tokenizer, calibration=calib_text, n_windows=8, seq_len=64,
                        quantizer=quantizer, refine=8.0, granularity="row", progress=False, cache=False)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    r = plan.extra["refine"]
    assert r["kl"] <= r["seed_kl"] and r["generations"] >= 1
    assert plan.true_bpw <= 3.3 + 1e-12 and plan.extra["quantizer"] == quantizer
    assert "row_check" in plan.extra or "fallback" in plan.extra       # checked on the model, or by the table


def test_fitness_assembles_row_plans_from_each_width(tiny_llama_dir, calib_text):
    """A row plan's weights are its rows taken from each width's whole-layer result (rows round on their own,
    in RTN and in GPTQ), so the fitness of a mixed plan is that of gptq(..., row_bits=)."""
    from bitalloc.fitness import KLFitness
    from bitalloc.quantize import as_quantizer
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=2, seq_len=64)
    fit = KLFitness(prepared, quantizer="gptq")
    u = prepared.units[3]
    rows = torch.arange(u.shape[0]) % 2                   # options 0 and 1 alternate over the rows
    W = fit.fp_weights[u.name].float()
    mixed = fit.weight(3, rows)
    bits = torch.tensor([prepared.options[int(j)].bits for j in rows], dtype=torch.int8)
    direct = as_quantizer("gptq").gptq(W, fit.H[u.name], QuantSpec(8), row_bits=bits).dequantize().to(mixed.dtype)
    assert torch.equal(mixed, direct)
    layer = [1] * len(prepared.units)
    assert fit(layer) > fit([3] * len(prepared.units)) >= 0


def test_width_check_drops_low_widths_only_when_they_measure_worse():
    """Additive costs that under-rate 2-bit layers (what GPTQ on Gemma-3-270M showed): the plan without widths
    below ⌊budget⌋ is taken when the measured fitness prefers it, the table's plan when the table was right."""
    from bitalloc.finish import check_widths, without_low_widths
    per_unit = torch.tensor([[1000.0, 500.0, 1.0, 0.0]] + [[1.0, 0.5, 0.3, 0.0]] * 5, dtype=torch.float64)
    rows = 128
    units = [Unit(f"layer{i}", (rows, 256)) for i in range(6)]
    table = SensitivityTable(units, [QuantSpec(b) for b in (2, 3, 4, 8)], per_unit, {"probe": "toy"},
                             per_unit.repeat_interleave(rows, 0) / rows)
    plan = api.solve(table, 3.3)
    assert any(s.bits == 2 for s in plan.layers.values())
    other = without_low_widths(table, plan)
    assert other is not None and all(s.bits >= 3 for s in other.layers.values()) and other.true_bpw <= 3.3

    def measured(two_bit_factor):
        def fitness(choice, n_windows=None):
            return sum(float(table.cost[i, int(c)]) * (two_bit_factor if table.options[int(c)].bits == 2 else 1)
                       for i, c in enumerate(choice))
        return fitness
    assert check_widths(table, plan, measured(1.0)).layers == plan.layers          # the table was right
    kept = check_widths(table, plan, measured(1000.0))
    assert kept.layers == other.layers and "chosen" in kept.extra["width_check"]
    assert without_low_widths(table, api.solve(table, 2.4)) is None                 # nothing below 2 bits
    row_plan = solve_rows(Problem(table, 3.3), "closed_form")
    assert any(int(b) == 2 for r in row_plan.row_bits.values() for b in r.tolist())
    assert all(int(b) >= 3 for r in without_low_widths(table, row_plan).row_bits.values() for b in r.tolist())


def test_the_fitness_fits_gptq_on_windows_it_does_not_score(tiny_llama_dir, calib_text):
    """GPTQ fits the windows it sees: scored on them, every plan looks better than it is on other text."""
    from bitalloc.fitness import HESSIAN_WINDOWS, KLFitness
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=6, seq_len=64)
    fit = KLFitness(prepared, max_windows=2, quantizer="gptq")
    assert torch.equal(fit._gptq_workload.tokens, prepared.tokens[2:2 + HESSIAN_WINDOWS])
    first = prepared.units[0]
    alone = KLFitness(prepared, quantizer="gptq")                 # scores all 6: nothing left, H from all of them
    assert torch.equal(alone._gptq_workload.tokens, prepared.tokens)
    assert not torch.allclose(fit.H[first.name], alone.H[first.name])


def test_scoring_a_plan_starts_from_the_fp_weights_whatever_the_model_holds(tiny_llama_dir, calib_text):
    """A fitness leaves its last plan loaded in the model; an Evaluator scoring after it must not quantize that."""
    from bitalloc.evaluate import Evaluator
    from bitalloc.fitness import KLFitness
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=4, seq_len=64)
    ev = Evaluator(prepared.model, prepared.kind, prepared.units, prepared.tokens[:2], progress=False)
    plan = api.solve(api.measure(prepared, "output_error", cache=False), 3.3)
    before = ev.score_plan(plan, "rtn", prepared.tokens)
    fit = KLFitness(prepared)
    fit([0] * len(prepared.units))                                # every unit at 2 bits, left in the model
    after = ev.score_plan(plan, "rtn", prepared.tokens)
    fit.restore()
    assert after.ppl == before.ppl and after.kl == before.kl


def test_width_check_reads_ggml_types_at_the_width_each_unit_stores():
    """Gemma-3-270M in ggml types: on 640-wide rows Q2_K/Q3_K are stored as Q4_0 (4 bits), so a floor drops
    them only on the rows where they are real 2/3-bit K-quants. At 4.2 bpw nothing fits without widths below
    4 bits (the narrow rows take 4.5 at least), so the check also tries one bit lower: no Q2_K."""
    from bitalloc.finish import check_widths, effective_bits, without_low_widths
    options = [QuantSpec.of_ggml(n) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q8_0")]
    units = [Unit(f"narrow{i}", (256, 640)) for i in range(4)] + [Unit(f"wide{i}", (256, 2048)) for i in range(4)]
    cost = torch.tensor([[3.0, 3.0, 1.0, 0.5, 0.0]] * 4 + [[5.0, 4.0, 1.0, 0.4, 0.0]] * 4, dtype=torch.float64)
    table = SensitivityTable(units, options, cost, {"probe": "toy"})
    bits = effective_bits(table)
    assert bits[0].tolist() == [4, 4, 5, 5, 8] and bits[-1].tolist() == [2, 3, 4, 5, 8]
    plan = api.solve(table, 4.2)
    assert any(plan.layers[u.name].ggml == "Q2_K" for u in units[4:])
    assert without_low_widths(table, plan, 4) is None            # infeasible: 4.5 bpw at least
    no_q2 = without_low_widths(table, plan, 3)
    assert no_q2 is not None and no_q2.true_bpw <= 4.2
    assert all(no_q2.layers[u.name].ggml != "Q2_K" for u in units[4:])
    # the same as dropping Q2_K outright (on narrow rows it is Q4_0, as Q3_K is), costs of any scale alike
    for scale in (1.0, 1e-6):
        scaled = SensitivityTable(units, options, cost * scale, {"probe": "toy"})
        dropped = SensitivityTable(units, options[1:], cost[:, 1:] * scale, {"probe": "toy"})
        assert without_low_widths(scaled, api.solve(scaled, 4.2), 3).layers == api.solve(dropped, 4.2).layers

    def measured(choice, n_windows=None):                # a real Q2_K hurts 100× what the table says
        return sum(float(cost[i, int(c)]) * (100 if int(bits[i, int(c)]) == 2 else 1) for i, c in enumerate(choice))
    checked = check_widths(table, plan, measured)
    assert checked.layers == no_q2.layers and checked.extra["width_check"]["chosen"] == "no widths below 3 bits"
    assert check_widths(table, plan, lambda choice, n_windows=None: 0.0).layers == plan.layers


def test_the_check_stops_scoring_plans_far_behind_on_the_first_windows():
    """The check scores every candidate on the first quarter of its windows and the rest only for those within
    RACE_FACTOR of the best there; the plan itself is always scored in full, and a dropped candidate is never
    returned."""
    from bitalloc.finish import RACE_FACTOR, check_widths
    per_unit = torch.tensor([[1000.0, 500.0, 1.0, 0.0]] + [[1.0, 0.5, 0.3, 0.0]] * 5, dtype=torch.float64)
    units = [Unit(f"layer{i}", (128, 256)) for i in range(6)]
    table = SensitivityTable(units, [QuantSpec(b) for b in (2, 3, 4, 8)], per_unit, {"probe": "toy"})
    plan = api.solve(table, 3.3)             # 2 to 4 bits; the one candidate, no widths below 3, is all W3

    def resumable(all_three: float):
        calls = []

        class Fitness:
            resumable, max_windows = True, 8

            def __call__(self, choice, n_windows=None, first=0):
                calls.append(first)
                bits = {table.options[int(c)].bits for c in choice}
                return (all_three if bits == {3} else 1.5) + first     # later windows score worse: weighted
        return Fitness(), calls
    far, calls = resumable(100.0)
    checked = check_widths(table, plan, far)
    record = checked.extra["width_check"]
    assert record["early"] == {"without_low_widths_kl": 2} and record["without_low_widths_kl"] == 100.0
    assert checked.layers == plan.layers and "chosen" not in record
    assert record["kl"] == pytest.approx((1.5 * 2 + 3.5 * 6) / 8) and calls == [0, 0, 2]
    near, calls = resumable(1.5 / RACE_FACTOR)        # within the factor: scored in full, and it wins
    checked = check_widths(table, plan, near)
    assert checked.extra["width_check"]["chosen"] == "no widths below 3 bits" and calls == [0, 0, 2, 2]
    assert "early" not in checked.extra["width_check"]


def test_the_fitness_scores_any_run_of_windows_as_the_whole_does(tiny_llama_dir, calib_text):
    from bitalloc.fitness import KLFitness
    prepared = api.prepare(tiny_llama_dir, calibration=calib_text, n_windows=8, seq_len=64)
    fit = KLFitness(prepared, max_windows=8, stride=2)
    choice = [1] * len(prepared.units)
    whole = fit(choice, 8)
    assert whole == pytest.approx((fit(choice, 2) * 2 + fit(choice, 8, first=2) * 6) / 8, rel=1e-6)
    assert fit(choice, 5, first=2) == pytest.approx((fit(choice, 5) * 5 - fit(choice, 2) * 2) / 3, rel=1e-6)
