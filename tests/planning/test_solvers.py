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
        group = "blk.qkv" if fused and i < 3 else None
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


class TestILPWithCBC(TestILP):
    """The same contract through PuLP and CBC (what ``auto`` falls back on)."""
    settings = {"backend": "cbc"}


@pytest.mark.parametrize("seed", range(6))
def test_the_in_process_knapsack_matches_cbc_on_larger_tables(seed):
    table = random_table(40 + 30 * seed, 300 + seed)
    lo = float(table.sizes().min(1).values.sum() / table.numels().sum())
    budget = lo + 0.3 * (4.2 - lo)
    fast, cbc = get_solver("ilp")(table, budget), get_solver("ilp", backend="cbc")(table, budget)
    assert fast.true_bpw <= budget + 1e-12
    assert fast.objective <= cbc.objective * (1 + 1e-9)         # proven optimal: never behind CBC


def test_a_knapsack_search_that_gives_up_returns_none_and_ilp_asks_cbc(monkeypatch):
    import numpy as np

    from bitalloc.solvers import mckp
    table = random_table(30, 7)
    problem = Problem(table, 3.1)
    cost, size = table.cost.numpy(), problem.size.numpy()
    assert mckp.solve_mckp(cost, size, problem.capacity, max_nodes=0) is None
    calls = []
    monkeypatch.setattr(mckp, "MAX_NODES", 0)
    real = mckp.solve_mckp
    monkeypatch.setattr(mckp, "solve_mckp", lambda *a, **k: calls.append(1) or real(*a, **{**k, "max_nodes": 0}))
    plan = get_solver("ilp").solve(problem)
    assert calls and plan.objective == pytest.approx(get_solver("ilp", backend="cbc").solve(problem).objective, rel=1e-9)
    with pytest.raises(ValueError):
        mckp.solve_mckp(cost, size, float(np.min(size, 1).sum()) * 0.99)


def test_unknown_solver():
    with pytest.raises(BitallocError, match="unknown solver .nope.: choose one of uniform, ilp, closed_form"):
        get_solver("nope")


class ToyFitness:
    """A stand-in for the model's KL: the table's additive cost plus a neighbour interaction term."""

    def __init__(self, table):
        self.cost = table.cost

    def __call__(self, choice, n_windows=None):
        c = self.cost[torch.arange(len(choice)), torch.as_tensor(choice)]
        return float(c.sum() + 0.1 * (c[:-1] * c[1:]).sum())


class FitnessContract(SolverContract):
    """The contract for solvers that score plans with a fitness: the toy one above, built per table."""

    def solver(self):
        outer = self

        class WithToyFitness:
            def __call__(self, table, budget, **kw):
                return get_solver(outer.solver_name, fitness=ToyFitness(table), **outer.settings)(table, budget, **kw)

        return WithToyFitness()


class TestClosedForm(SolverContract):
    solver_name = "closed_form"

    @pytest.mark.parametrize("seed", range(10))
    def test_gap_to_ilp(self, seed):
        """Stated gap: within 10 % of the ILP optimum on 40-unit random tables (measured worst: see README)."""
        table = random_table(40, 200 + seed)
        lo = float(table.sizes().min(1).values.sum() / table.numels().sum())
        budget = lo + (0.1 + 0.08 * seed) * (8 - lo)
        ilp = get_solver("ilp")(table, budget)
        cf = self.solver()(table, budget)
        assert cf.true_bpw <= budget + 1e-9
        assert cf.objective <= ilp.objective * 1.10 + 1e-12

    def test_million_units_on_arrays(self):
        from bitalloc.solvers.closed_form import closed_form_choice
        g = torch.Generator().manual_seed(0)
        U = 100_000
        numel = torch.full((U,), 4096.0, dtype=torch.float64)
        bpw = torch.tensor([2.125, 3.125, 4.125, 8.125], dtype=torch.float64)
        size = numel[:, None] * bpw
        cost = torch.rand(U, 1, generator=g, dtype=torch.float64) * 2.0 ** (-1.9 * bpw)
        choice = closed_form_choice(cost, size, numel, 3.0 * float(numel.sum()))
        used = float(size[torch.arange(U), choice].sum() / numel.sum())
        assert 2.99 < used <= 3.0


class TestEvolutionary(FitnessContract):
    solver_name = "evolutionary"
    settings = {"generations": 6, "offspring": 4, "progress": False}

    def test_never_worse_than_its_seed(self):
        table = random_table(12, 7)
        fit = ToyFitness(table)
        plan = get_solver("evolutionary", fitness=fit, generations=30, progress=False)(table, 3.3)
        seed = get_solver("ilp")(table, 3.3)
        index = {o: j for j, o in enumerate(table.options)}
        as_choice = lambda p: [index[p.layers[u.name]] for u in table.units]  # noqa: E731
        assert fit(as_choice(plan)) <= fit(as_choice(seed))
        assert plan.extra["kl"] <= plan.extra["seed_kl"]

    def test_needs_a_fitness(self):
        with pytest.raises(BitallocError, match="scores plans on the model"):
            get_solver("evolutionary")(random_table(3, 0), 3.0)


class TestOptuna(FitnessContract):
    solver_name = "optuna"
    settings = {"n_trials": 6, "progress": False}

    def test_study_settings_must_match(self, tmp_path):
        table = random_table(5, 1)
        url = f"sqlite:///{tmp_path / 's.db'}"
        get_solver("optuna", fitness=ToyFitness(table), n_trials=2, storage=url, study_name="s",
                   progress=False)(table, 3.0)
        with pytest.raises(BitallocError, match="exists with different settings .*budget"):
            get_solver("optuna", fitness=ToyFitness(table), n_trials=2, storage=url, study_name="s",
                       progress=False)(table, 3.5)

    def test_trials_store_their_plan(self, tmp_path):
        import json

        import optuna
        table = random_table(5, 1)
        url = f"sqlite:///{tmp_path / 's.db'}"
        get_solver("optuna", fitness=ToyFitness(table), n_trials=4, storage=url, study_name="p",
                   progress=False)(table, 3.0)
        study = optuna.load_study(study_name="p", storage=url)
        trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(trials) == 4
        for t in trials:
            plan = json.loads(t.user_attrs["plan"])
            assert set(plan["layers"]) == {u.name for u in table.units}


class TestOptunaWidths(TestOptuna):
    """The same contract for the categorical (one width per layer, repaired to the budget) space."""
    settings = {"n_trials": 6, "progress": False, "space": "widths"}


class TestOptunaReweight:
    def test_zero_multipliers_give_the_ilp_plan_and_a_raised_row_never_loses_bits(self):
        from bitalloc.solvers import Problem
        from bitalloc.solvers.optuna_search import _reweighted_optimum
        table = random_table(12, 3)
        problem = Problem(table, 3.3)
        groups = problem.groups()
        index = {o: j for j, o in enumerate(table.options)}
        ilp = get_solver("ilp")(table, 3.3)
        base = _reweighted_optimum(problem, groups, torch.zeros(len(groups), dtype=torch.float64))
        assert base.tolist() == [index[ilp.layers[u.name]] for u in table.units]
        size = problem.size
        for k in range(len(groups)):
            up = torch.zeros(len(groups), dtype=torch.float64)
            up[k] = 3.0
            raised = _reweighted_optimum(problem, groups, up)
            assert problem.fits(raised)
            assert size[k, raised[k]] >= size[k, base[k]], f"unit {k} lost bits when its costs were raised"

    def test_first_trial_is_the_ilp_plan_and_best_is_no_worse(self):
        table = random_table(10, 4)
        fit = ToyFitness(table)
        solver = get_solver("optuna", fitness=fit, n_trials=12, progress=False)
        study = solver.run(Problem(table, 3.2))
        ilp = get_solver("ilp")(table, 3.2)
        index = {o: j for j, o in enumerate(table.options)}
        seed_kl = fit([index[ilp.layers[u.name]] for u in table.units])
        assert study.trials[0].value == pytest.approx(seed_kl)
        assert study.best_value <= seed_kl

    def test_bad_settings(self):
        table = random_table(4, 0)
        with pytest.raises(BitallocError, match="give --budget, or use --space widths"):
            get_solver("optuna", fitness=ToyFitness(table), multi_objective=True, space="reweight",
                       progress=False).run(Problem(table, 16.0))
        with pytest.raises(BitallocError, match="must be positive"):
            get_solver("optuna", fitness=ToyFitness(table), spread=0.0, progress=False)(table, 3.0)
