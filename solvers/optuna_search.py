"""optuna: an Optuna study over whole plans, on one machine or many.

Every trial is a plan scored on the model (KL to fp, alloc/fitness.py). Two modes:

* single-objective under the budget (the ``optuna`` solver, ``bitalloc search --budget B``). Two search
  spaces:
  - ``reweight`` (default): one float per unit (or fused group), a log-multiplier in [-spread, spread] on
    that unit's row of the cost table; the trial's plan is the exact ``ilp`` optimum of the reweighted
    table. Every trial is thus a budget-feasible plan near the table's optimum, and the study learns
    where the additive table is wrong (layer interactions). All-zero multipliers (the table's own ILP
    plan) are enqueued as trial 0.
  - ``widths``: one categorical option per unit; the sampled plan is repaired to the TRUE budget (greedy
    downgrades by cost per bit saved). The table's ILP plan is enqueued as trial 0.
  Trials that land on a plan already scored reuse its KL.
* multi-objective (``bitalloc search`` without ``--budget``): ``widths`` space, minimize (true bpw, KL)
  with NSGA-II or TPE, and read the Pareto front off the study.

Every finished trial stores its plan JSON in the user attribute ``plan``. Storage is an SQLite file by
default; a ``postgresql://`` URL lets many workers share a study (``load_if_exists``), with heartbeats so
the RUNNING trial of a killed worker is marked failed after ``grace`` seconds and re-queued by
``RetryHeartbeatStaleTrialCallback``. The study's settings (model, budget, options, objective) are stored on it;
a worker whose settings differ is refused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BitallocError
from ..plan import BitPlan
from .base import Problem, Solver, get_solver


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a trial ended by Ctrl-C or SIGTERM with its traceback; the user asked it to stop, so the
    line is kept and the traceback dropped (the command then says in one line what was left)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


_TRIAL_LOG = logging.getLogger("optuna.study._optimize")
if not any(isinstance(f, _NoInterruptTraceback) for f in _TRIAL_LOG.filters):
    _TRIAL_LOG.addFilter(_NoInterruptTraceback())



def make_storage(url: str, *, heartbeat: int | None = None, grace: int | None = None):
    """An Optuna RDB storage, with heartbeats when asked; an unreachable server is one clear line."""
    import warnings

    import optuna
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        kwargs["engine_kwargs"] = {"connect_args": {"connect_timeout": 5}}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():  # heartbeats (what retries a killed worker's trial) are "experimental"
            warnings.simplefilter("ignore", ExperimentalWarning)
            if heartbeat:
                kwargs.update(heartbeat_interval=heartbeat, grace_period=grace or 2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            return RDBStorage(url, **kwargs)
    except Exception as e:  # sqlalchemy.exc.OperationalError, ArgumentError, missing driver, …
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BitallocError(f"cannot open the study storage {redact(url)}: {first[:200]}") from None


def redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://…@{rest.split('@', 1)[1]}"
    return url


def _repair(problem: Problem, groups, g_cost, g_size, choice: list[int]) -> list[int]:
    """Downgrade, cheapest loss per bit saved first, until the plan fits the true budget."""
    choice = list(choice)
    while sum(float(g_size[k, j]) for k, j in enumerate(choice)) > problem.capacity * (1 + 1e-12):
        best = None
        for k, j in enumerate(choice):
            for j2 in range(g_size.shape[1]):
                saved = float(g_size[k, j] - g_size[k, j2])
                if saved > 0:
                    ratio = float(g_cost[k, j2] - g_cost[k, j]) / saved
                    if best is None or ratio < best[0]:
                        best = (ratio, k, j2)
        if best is None:
            break
        choice[best[1]] = best[2]
    return choice


def _reweighted_optimum(problem: Problem, groups: list[list[int]], log_mult: torch.Tensor) -> torch.Tensor:
    """The exact (ilp) plan of the table whose rows are scaled by exp(log_mult) per group: (U,) option indices."""
    from dataclasses import replace
    scale = torch.ones(problem.n_units, dtype=torch.float64)
    for k, members in enumerate(groups):
        scale[members] = float(torch.exp(log_mult[k]))
    table = replace(problem.table, cost=problem.table.cost * scale[:, None])
    plan = get_solver("ilp").solve(Problem(table, problem.budget_bits, problem.count_overhead, problem.fuse))
    index = {o: j for j, o in enumerate(problem.table.options)}
    return torch.tensor([index[plan.layers[u.name]] for u in problem.table.units], dtype=torch.long)


@dataclass
class OptunaSolver(Solver):
    """Single-objective study under the budget; returns the best trial's plan."""
    name = "optuna"
    fitness: Any = None
    n_trials: int = 100
    study_name: str | None = None
    storage: str | None = None        # None: in memory for the solver; the CLI defaults to SQLite
    sampler: str = "tpe"
    seed: int = 0
    windows: int = 4                  # calibration windows per trial
    heartbeat: int | None = None
    grace: int | None = None
    timeout: float | None = None
    settings: dict | None = None      # stored on the study; a study with other settings is refused
    multi_objective: bool = False
    space: str | None = None          # "reweight" or "widths"; None: reweight, widths when multi-objective
    spread: float = 0.3               # reweight: log-multipliers lie in [-spread, spread]
    trial_delay: float = 0.0          # seconds slept inside each trial (tests kill a worker mid-trial)
    progress: bool = True

    def solve(self, problem: Problem) -> BitPlan:
        study = self.run(problem)
        if self.multi_objective:
            raise BitallocError("a multi-objective study has a Pareto front, not one plan: read it with "
                                "`bitalloc search` (it prints the front)")
        return problem.plan(study.best_trial.user_attrs["choice"], self.name, kl=study.best_value,
                            study=study.study_name, trial=study.best_trial.number)

    def run(self, problem: Problem):
        import optuna
        if self.fitness is None:
            raise BitallocError("the optuna solver scores plans on the model: run `bitalloc search` or "
                                "`bitalloc allocate --solver optuna`")
        groups = problem.groups()
        g_cost = torch.stack([problem.cost[g].sum(0) for g in groups]).double()
        g_size = torch.stack([problem.size[g].sum(0) for g in groups]).double()
        labels = [o.label() for o in problem.table.options]
        units = problem.table.units
        names = [units[g[0]].fused_group if len(g) > 1 else units[g[0]].name for g in groups]
        space = self.space or ("widths" if self.multi_objective else "reweight")
        if space not in ("reweight", "widths"):
            raise BitallocError(f"unknown search space {space!r}: choose reweight or widths")
        if space == "reweight" and self.multi_objective:
            raise BitallocError("the reweight space solves each trial under one budget: give --budget, or use "
                                "--space widths for a multi-objective study")
        if not self.spread > 0:
            raise BitallocError(f"--spread {self.spread} must be positive (e.g. 0.3)")
        optuna.logging.set_verbosity(optuna.logging.WARNING)   # a progress bar instead of a line per trial
        storage = make_storage(self.storage, heartbeat=self.heartbeat, grace=self.grace) if self.storage else None
        if self.sampler == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(seed=self.seed)
        elif self.sampler == "tpe":
            sampler = optuna.samplers.TPESampler(seed=self.seed, multivariate=True)
        elif self.sampler == "random":
            sampler = optuna.samplers.RandomSampler(seed=self.seed)
        else:
            raise BitallocError(f"unknown sampler {self.sampler!r}: choose tpe, nsga2 or random")
        directions = ["minimize", "minimize"] if self.multi_objective else ["minimize"]
        name = self.study_name or f"bitalloc-{int(time.time())}"
        settings = dict(self.settings or {})
        unit_names = hashlib.blake2b(json.dumps([[u.name, list(u.shape), u.fused_group] for u in units]).encode(),
                                     digest_size=8).hexdigest()
        settings.update(budget=None if self.multi_objective else problem.budget_bits, options=labels,
                        units=len(groups), unit_names=unit_names, multi_objective=self.multi_objective,
                        windows=self.windows, space=space, count_overhead=problem.count_overhead, fuse=problem.fuse,
                        table=problem.table.meta.get("data_hash"))
        if space == "reweight":
            settings["spread"] = self.spread
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions,
                                        load_if_exists=True)
        except ValueError as e:   # e.g. directions differ from the stored study's
            raise BitallocError(f"study {name!r} exists with different settings ({e}): choose another --study") from None
        stored = study.user_attrs.get("bitalloc_settings")
        if study.metric_names is None:      # the dashboard's axis names: what the study minimises, not "Objective 0"
            with warnings.catch_warnings():          # set_metric_names is "experimental" in optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["true bits/weight", "KL to fp"] if self.multi_objective else ["KL to fp"])
        if stored is None:
            study.set_user_attr("bitalloc_settings", settings)
            if space == "reweight":             # start from the table's optimum
                study.enqueue_trial({n: 0.0 for n in names})
            elif not self.multi_objective:
                seed_plan = get_solver("ilp").solve(problem)
                study.enqueue_trial({n: seed_plan.layers[problem.table.units[g[0]].name].label()
                                     for n, g in zip(names, groups)})
        elif stored != settings:
            diff = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            raise BitallocError(f"study {name!r} exists with different settings ({', '.join(diff)}): "
                                "use the same settings or choose another --study")
        index = {lab: j for j, lab in enumerate(labels)}
        scored: dict[tuple[int, ...], float] = {}     # plan -> KL, within this worker

        def objective(trial):
            if space == "reweight":
                log_mult = torch.tensor([trial.suggest_float(n, -self.spread, self.spread) for n in names],
                                        dtype=torch.float64)
                choice = _reweighted_optimum(problem, groups, log_mult)
            else:
                picked = [index[trial.suggest_categorical(n, labels)] for n in names]
                choice_g = picked if self.multi_objective else _repair(problem, groups, g_cost, g_size, picked)
                choice = torch.zeros(problem.n_units, dtype=torch.long)
                for k, members in enumerate(groups):
                    choice[members] = choice_g[k]
            if self.trial_delay:
                time.sleep(self.trial_delay)
            key = tuple(int(c) for c in choice)
            if key not in scored:
                scored[key] = float(self.fitness(choice, self.windows))
            kl = scored[key]
            plan = problem.plan(choice, self.name, kl=kl, study=name, trial=trial.number)
            trial.set_user_attr("plan", json.dumps(plan.to_json()))
            trial.set_user_attr("true_bpw", plan.true_bpw)
            trial.set_user_attr("choice", [int(c) for c in choice])
            return (plan.true_bpw, kl) if self.multi_objective else kl

        callbacks = []
        if self.n_trials:
            from optuna.study import MaxTrialsCallback
            callbacks.append(MaxTrialsCallback(self.n_trials, states=(optuna.trial.TrialState.COMPLETE,)))
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
        remaining = max(0, self.n_trials - done)
        try:
            if remaining:
                study.optimize(objective, n_trials=remaining, timeout=self.timeout, callbacks=callbacks,
                               show_progress_bar=self.progress and not os.environ.get("CI"))
        finally:                      # an interrupted or failed study leaves the model as it found it
            restore = getattr(self.fitness, "restore", None)
            if restore:
                restore()
        return study
