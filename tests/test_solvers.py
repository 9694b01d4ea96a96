"""The contract every solver meets (like optuna's sampler test cases), then solver-specific checks."""
import itertools
import math

import pytest
import torch

from bitalloc import BitallocError, QuantSpec
from bitalloc.sensitivity.table import SensitivityTable
from bitalloc.solvers import Problem, get_solver
from bitalloc.units import Unit

OPTIONS = [QuantSpec(b) for b in (2, 3, 4, 8)]
SHAPES = [(128, 128), (384, 128), (256, 512), (64, 256), (512, 384)]


def random_table(n_units: int, seed: int, fused: bool = False) -> SensitivityTable:
    g = torch.Generator().manual_seed(seed)
    units = []
    for i in range(n_units):
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        group = f"blk.qkv" if fused and i < 3 else None
        units.append(Unit(f"layer{i}", shape if not group else (128, 128), "linear", group))
    base = torch.rand(n_units, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    decay = torch.rand(n_units, 1, generator=g, dtype=torch.float64) + 0.5
    bits = torch.tensor([o.bits for o in OPTIONS], dtype=torch.float64)
    cost = base * torch.exp(-decay * bits) * (1 + 0.3 * torch.rand(n_units, len(OPTIONS), generator=g, dtype=torch.float64))
    return SensitivityTable(units, OPTIONS, cost, {"probe": "toy"})


def brute_force(problem: Problem) -> float:
    best = math.inf
    for choice in itertools.product(range(problem.n_options), repeat=problem.n_units):
        c = torch.tensor(choice)
        if problem.fits(c):
            best = min(best, problem.total(c)[0])
    return best


class SolverContract:
    solver_name: str
    settings: dict = {}

    def solver(self):
        return get_solver(self.solver_name, **self.settings)

    @pytest.mark.parametrize("seed", range(8))
    @pytest.mark.parametrize("budget", [2.2, 2.6, 3.25, 4.5, 8.3])
    def test_never_over_budget(self, seed, budget):
        table = random_table(8, seed)
        plan = self.solver()(table, budget)
        assert plan.true_bpw <= budget + 1e-9
        assert list(plan.layers) == [u.name for u in table.units]

    def test_nominal_budget(self):
        plan = self.solver()(random_table(6, 1), 3.0, count_overhead=False)
        assert plan.nominal_bpw <= 3.0 + 1e-9 and plan.true_bpw > plan.nominal_bpw

    def test_same_seed_same_plan(self):
        table = random_table(10, 3)
        assert self.solver()(table, 3.1).layers == self.solver()(table, 3.1).layers

    def test_infeasible_budget_names_smallest(self):
        table = random_table(5, 2)
        smallest = float(table.sizes().min(1).values.sum() / table.numels().sum())
        with pytest.raises(BitallocError, match=r"infeasible.*--budget ≥ 2\.1"):
            self.solver()(table, 2.0)
        plan = self.solver()(table, math.ceil(smallest * 1e4) / 1e4)      # the named budget is feasible
        assert plan.true_bpw <= smallest + 1e-4

    @pytest.mark.parametrize("budget", [0, -1, 16.5, float("nan")])
    def test_out_of_range_budget(self, budget):
        with pytest.raises(BitallocError):
            self.solver()(random_table(3, 0), budget)

    @pytest.mark.parametrize("seed", range(4))
    def test_fused_groups_share_a_width(self, seed):
        plan = self.solver()(random_table(7, seed, fused=True), 3.3, fuse=True)
        assert len({plan.layers[f"layer{i}"] for i in range(3)}) == 1
        assert plan.true_bpw <= 3.3 + 1e-9


class TestUniform(SolverContract):
    solver_name = "uniform"

    def test_picks_best_single_option(self):
        plan = self.solver()(random_table(6, 0), 3.2)
        assert set(plan.layers.values()) == {QuantSpec(3)}


class TestILP(SolverContract):
    solver_name = "ilp"

    @pytest.mark.parametrize("seed", range(60))
    def test_equals_brute_force(self, seed):
        n = 3 + seed % 4
        table = random_table(n, 100 + seed)
        lo = float(table.sizes().min(1).values.sum() / table.numels().sum())
        budget = lo + (0.2 + 0.15 * (seed % 7)) * (4.2 - lo)
        problem = Problem(table, budget)
        plan = self.solver().solve(problem)
        assert plan.objective == pytest.approx(brute_force(problem), rel=1e-9, abs=1e-12)

    def test_bit_range_and_second_resource(self, tmp_path):
        table = random_table(6, 5)
        plan = get_solver("ilp", min_bits=3)(table, 4.0)
        assert min(s.bits for s in plan.layers.values()) >= 3
        latency = torch.tensor([[1.0, 1.5, 2.0, 4.0]] * 6)           # per unit × option
        plan = get_solver("ilp", resource=latency, resource_limit=9.0)(table, 8.5)
        assert sum(latency[0, OPTIONS.index(s)] for s in plan.layers.values()) <= 9.0
        lp = tmp_path / "model.lp"
        get_solver("ilp", dump_lp=str(lp))(table, 3.0)
        assert "budget:" in lp.read_text() and "pick_0:" in lp.read_text()


def test_unknown_solver():
    with pytest.raises(BitallocError, match="unknown solver 'nope': choose one of uniform, ilp"):
        get_solver("nope")
