"""The public verbs: ``allocate`` (model -> BitPlan) and the steps it is made of.

    prepare(model, calibration)       model, tokenizer, units, options, calibration windows
    measure(prepared, probe)          SensitivityTable, cached on disk by content hash
    solve(table, budget, solver)      BitPlan
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checks
from .calibration import calibration_text, check_text_file, data_hash, read_text, windows
from .config import (CHECK_WINDOWS, DEFAULT_EFFORT, DEFAULT_GROUP_SIZE, DEFAULT_PROBE, DEFAULT_SEQ_LEN,
                     DEFAULT_WINDOWS, GRANULARITIES, AllocateConfig)
from .errors import BitallocError, SettingError
from .registry import ROW_SOLVERS
from .models.identity import model_info
from .models.loading import load_model
from .models.workload import make_workload
from .options import QuantSpec, parse_options
from .plan import BitPlan
from .table_cache import lookup, store, table_path
from .units import EXPERT_KINDS, Unit, check_weights, find_units



@dataclass
class Prepared:
    """A model ready for probing: what ``allocate`` works on."""

    model: nn.Module
    _tokenizer: Any                   # None when prepare let it go after tokenizing: ``tokenizer`` loads it again
    kind: str                         # "causal_lm" or "encoder"
    units: list[Unit]
    options: list[QuantSpec]
    tokens: torch.Tensor              # (n_windows, seq_len) calibration token ids
    info: dict = field(default_factory=dict)
    batch_size: int = 8
    compute_device: str | None = None     # weights on the host, probes streamed block by block to this device
    scope: dict = field(default_factory=dict)   # which modules are units: include, exclude, experts (plans record it)
    tokenizer_folder: str | None = None           # where ``tokenizer`` loads from once let go
    held_out: torch.Tensor | None = None          # calibration windows after ``tokens``: the checks score on them

    @property
    def tokenizer(self):
        """The model's tokenizer. A tokenizer prepare loaded itself is let go once the calibration text is
        tokenized (Gemma-3's holds 330 MB the probes would carry) and loaded again here on first use."""
        if self._tokenizer is None and self.tokenizer_folder is not None:
            from .models.loading import load_tokenizer
            self._tokenizer = load_tokenizer(self.tokenizer_folder)
        return self._tokenizer

    @property
    def workload(self):
        return make_workload(self.model, self.kind, self.tokens, batch_size=self.batch_size,
                             compute_device=self.compute_device, units=self.units)


def prepare(model: nn.Module | str | os.PathLike | None = None, *, calibration: str | torch.Tensor | None = None,
            calib_file: str | os.PathLike | None = None, tokenizer: Any = None, options: list[QuantSpec] | str | None = None,
            include: tuple[str, ...] = (), seq_len: int = DEFAULT_SEQ_LEN, n_windows: int = DEFAULT_WINDOWS,
            batch_size: int = 8, strict_windows: bool = False, experts: str = "per-expert",
            exclude: tuple[str, ...] = (), dtype: str | torch.dtype | None = "auto",
            held_out: int = 0) -> Prepared:
    """Load (if a path; in the checkpoint's own dtype unless ``dtype`` says otherwise), find units, tokenize
    calibration text into windows.

    ``calibration``: text, or a (n, seq) tensor of token ids; ``calib_file``: a text file; neither: Python's
    own help topics (alloc/calibration.py). ``experts``: MoE experts per-expert or per-layer; ``exclude``:
    modules kept in full precision; ``held_out``: up to this many more windows of the text, after the
    calibration windows, kept apart (``Prepared.held_out``) for the checks to score plans on."""
    seq_len, n_windows = checks.count(seq_len, "seq_len"), checks.count(n_windows, "n_windows")
    batch_size = checks.count(batch_size, "batch_size")
    checks.one_of(experts, ("per-expert", "per-layer"), "experts")
    if calib_file is not None:
        checks.input_file(calib_file, "calibration file", "UTF-8 text file")
        check_text_file(calib_file)                 # UTF-16, binary: refused before the model loads
    if not (model is None or isinstance(model, (str, os.PathLike, nn.Module))):
        raise BitallocError(f"model must be an nn.Module or a local model folder, got {type(model).__name__}")
    folder = None                                         # a tokenizer loaded here is let go after use
    if model is None or isinstance(model, (str, os.PathLike)):
        model, _, kind = load_model(model, dtype=dtype, tokenizer=False)
        folder = model.bitalloc_folder
    else:
        kind = "causal_lm" if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None \
            else "encoder"
        if tokenizer is None:
            path = getattr(model, "name_or_path", None)
            if path and Path(path).is_dir():
                folder = str(path)
            elif not isinstance(calibration, torch.Tensor):
                raise BitallocError("pass tokenizer= or calibration token ids: the model has no local path to load a tokenizer from")
    ours = tokenizer is None and folder is not None and not isinstance(calibration, torch.Tensor)
    if ours:
        from .models.loading import load_tokenizer
        tokenizer = load_tokenizer(folder)
    model.eval()
    units = find_units(model, include=include, experts=experts, exclude=exclude)
    check_weights(model, units)
    if isinstance(options, str) or options is None:
        options = parse_options(options)
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_len and seq_len > max_len:
        seq_len = max_len
    if isinstance(calibration, torch.Tensor):
        tokens, spare = calibration.long(), calibration[:0]
        if tokens.dim() != 2 or tokens.numel() == 0:
            raise BitallocError("calibration token ids must be a non-empty (n_windows, seq_len) tensor")
    else:
        text = _calibration_prefix(tokenizer, calibration if isinstance(calibration, str) else calib_file,
                                   (n_windows + held_out) * seq_len,
                                   is_file=not isinstance(calibration, str) and calib_file is not None)
        if not text.strip():
            raise BitallocError("calibration text is empty: give at least one window of text")
        source = f"calibration file {str(calib_file)!r}" if calib_file else "calibration text"
        tokens = windows(tokenizer, text, seq_len=seq_len, n_windows=n_windows, source=source, strict=strict_windows,
                         spare=held_out)
        tokens, spare = tokens[:n_windows], tokens[n_windows:]
    info = model_info(model, units)
    scope = {"include": list(include), "exclude": list(exclude), "experts": experts}
    if ours:                              # let it go: loaded again when asked for (Prepared.tokenizer)
        tokenizer = None
        from .sensitivity.streamed import release_freed_memory
        release_freed_memory()
    return Prepared(model, tokenizer, kind, units, list(options), tokens, info, batch_size, scope=scope,
                    tokenizer_folder=folder if tokenizer is None else None, held_out=spare if len(spare) else None)


def _calibration_prefix(tokenizer, source, tokens: int, *, is_file: bool) -> str:
    """The calibration text up to a little past ``tokens`` tokens (all of it when the prefix falls short):
    a few windows do not read and tokenize a whole corpus."""
    need = tokens + 64                              # the prefix's last tokens may split differently: spare some
    text, whole = calibration_text(source, need, is_file=is_file)
    if whole or len(tokenizer(text, add_special_tokens=False).input_ids) >= need:
        return text
    return read_text(source) if is_file else calibration_text(source, 1 << 62, is_file=False)[0]


def measure(prepared: Prepared, probe: str = DEFAULT_PROBE, *, settings: dict | None = None,
            cache: bool = True):
    """The SensitivityTable of ``probe`` on ``prepared``; loaded from the cache when every input matches
    (alloc/table_cache.py)."""
    from .sensitivity import get_probe
    probe_obj = get_probe(probe, **(settings or {}))
    path = table_path(prepared, probe, probe_obj.settings())
    if cache:
        table = lookup(path, prepared, probe_obj.gives_rows)
        if table is not None:
            return table
    table = probe_obj.measure(prepared.workload, prepared.units, prepared.options)
    table.meta.update(model=prepared.info, scope=prepared.scope, data_hash=data_hash(prepared.tokens),
                      n_windows=len(prepared.tokens), seq_len=prepared.tokens.shape[1])
    if cache:
        store(table, path)
    return table


def solve(table, budget_bits: float, solver: str = "ilp", *, settings: dict | None = None,
          count_overhead: bool = True, fuse: bool = False, granularity: str = "layer") -> BitPlan:
    """The plan of ``table`` under ``budget_bits``. ``granularity="row"`` gives every output row its own width
    (solvers/rows.py: closed_form, greedy or ilp over row groups; the table needs row costs)."""
    checks.one_of(granularity, GRANULARITIES, "granularity")
    if granularity == "row":
        from .solvers.base import Problem
        from .solvers.rows import solve_rows
        checks.one_of(solver, ROW_SOLVERS, "solver", why="for granularity row")
        return solve_rows(Problem(table, budget_bits, count_overhead=count_overhead, fuse=fuse), solver,
                          **{k: v for k, v in (settings or {}).items() if k in ("rows_per_group", "time_limit")})
    if solver == "greedy":
        raise SettingError("solver", "the greedy solver works at row granularity: set granularity row, or use ilp")
    from .solvers import get_solver
    plan = get_solver(solver, **(settings or {}))(table, budget_bits, count_overhead=count_overhead, fuse=fuse)
    _say_if_saturated(table, plan, budget_bits, count_overhead)
    return plan


def _say_if_saturated(table, plan: BitPlan, budget_bits: float, count_overhead: bool) -> None:
    """A budget above what the widest option takes: say what the plan is instead (all W8 at 8.19, not 16)."""
    widest = max(table.options, key=lambda o: (o.bits, -o.group_size))
    used = plan.true_bpw if count_overhead else plan.nominal_bpw
    if budget_bits > used + 0.01 and all(s == widest for s in plan.layers.values()) and not plan.row_bits:
        import warnings

        from .errors import BitallocWarning
        warnings.warn(f"budget {budget_bits:g} is more than the widest option needs: the plan is all "
                      f"{widest.label()} at {used:.4f} {'true' if count_overhead else 'nominal'} bits per weight",
                      BitallocWarning, stacklevel=3)


def allocate(model: nn.Module | str | os.PathLike | None = None, budget_bits: float | None = None, *,
             size: int | str | None = None, format: str | None = None, memory: int | str | None = None,
             context: int | None = None, kv_type: str = "f16", batch: int = 1,
             calibration: str | torch.Tensor | None = None, tokenizer: Any = None, effort: Any = DEFAULT_EFFORT,
             probe: str | None = None, solver: str | None = None, options: list[QuantSpec] | str | None = None,
             include: tuple[str, ...] = (), fuse: bool = False, count_overhead: bool = True,
             seq_len: int = DEFAULT_SEQ_LEN, n_windows: int | None = None, cache: bool = True,
             experts: str = "per-expert", exclude: tuple[str, ...] = (), dtype: str = "auto",
             granularity: str = "layer", quantizer: str | None = None, refine: float | None = None,
             check: bool | None = None, target: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
             symmetric: bool = False, generations: int | None = None, time_limit: float | None = None,
             seed: int | None = None, stream: str = "auto", device: str | None = None,
             progress: bool = True) -> BitPlan:
    """Choose a width per layer so the model fits ``budget_bits`` TRUE bits per weight on average (default
    3.2), or a GGUF file of ``size`` bytes (e.g. "240MB"; with ``target="llama.cpp"``), or llama.cpp's whole
    ``memory`` at ``context`` tokens (the file, its KV cache in ``kv_type`` and its buffers: alloc/memory.py).

    ``model``: an ``nn.Module`` (with ``tokenizer=`` or token-id ``calibration``) or a local model folder (None:
    the embedded refllama-s); ``calibration``: text, a (n, seq) tensor of token ids, or None for the default
    text. Every other argument is a field of ``AllocateConfig`` (alloc/config.py documents each and resolves
    the defaults that depend on others: ``effort`` sets probe, quantizer, n_windows, check and refine where
    they are None; ``solver`` None is ilp per layer, closed_form per row), so this call, `bitalloc allocate`
    and the service give the same plan for the same settings.
    """
    if budget_bits is None and size is None and memory is None:
        budget_bits = 3.2
    config = AllocateConfig(
        budget_bits=budget_bits, size=size, format=format, memory=memory, context=context, kv_type=kv_type,
        batch=batch, effort=effort, probe=probe, solver=solver, granularity=granularity, quantizer=quantizer,
        options=options, group_size=group_size, symmetric=symmetric, fuse=fuse, count_overhead=count_overhead,
        experts=experts, include=tuple(include), exclude=tuple(exclude), target=target, seq_len=seq_len,
        n_windows=n_windows, dtype=dtype, stream=stream, check=check, refine=refine, generations=generations,
        time_limit=time_limit, seed=seed, cache=cache, device=device)
    return run_allocate(config, model, calibration=calibration, tokenizer=tokenizer, progress=progress).plan


# -- the flow: one function each surface calls ---------------------------------------------------------------
@dataclass
class Allocation:
    """What ``run_allocate`` made: the plan, and the prepared model and table it came from (for scoring)."""
    config: AllocateConfig
    prepared: Prepared
    table: Any
    plan: BitPlan


def run_allocate(config: AllocateConfig, model: nn.Module | str | os.PathLike | None = None, *,
                 calibration: str | torch.Tensor | None = None, tokenizer: Any = None, tables=None,
                 progress: bool = True, on_prepared=None) -> Allocation:
    """prepare → measure → solve → finish, as ``config`` says. ``tables``: where measured tables are kept
    (default the file cache; the service passes its store); ``on_prepared(prepared)``: called once the model
    is loaded and calibrated (the CLI prints the calibration there)."""
    prepared = prepare_for(config, model, calibration=calibration, tokenizer=tokenizer)
    config = config.for_model(moe=any(u.kind in EXPERT_KINDS for u in prepared.units))
    if on_prepared is not None:
        on_prepared(prepared)
    if config.size is None and config.memory is None:
        table = measure_for(prepared, config, tables)
        plan = plan_for(table, config, prepared, progress=progress)
    else:                                     # a size too small is refused before the probe runs
        from .budgets import bits_for_size
        size, memory = config.size, None
        if config.memory is not None:         # the file's share of the memory at that context (alloc/memory.py)
            from .memory import size_for_memory
            size, memory = size_for_memory(prepared.model, prepared.tokenizer, prepared.units, prepared.options,
                                           config.memory, config.context, config.kv_type, config.batch)
        bits = bits_for_size(prepared.model, prepared.tokenizer, prepared.units, prepared.options, size,
                             config.format)
        table = measure_for(prepared, config, tables)
        plan = _plan_for_size(table, config, prepared, bits, size, progress)
        if memory is not None:
            weights = plan.extra["size"]["predicted_bytes"]
            plan.extra["memory"] = dict(memory, weights_bytes=weights, predicted_bytes=weights + memory["total"])
    return Allocation(config, prepared, table, plan)


SIZE_SLACK = 4096          # bytes: the first margin when a plan for a size comes out over it (then 8× each time)


def _plan_for_size(table, config: AllocateConfig, prepared: Prepared, bits: float, size: int,
                   progress: bool) -> BitPlan:
    """The plan whose output (``config.format``) fits ``size`` bytes, from ``bits`` per planned weight (what
    the size leaves them); should the exact size pass the target, the budget shrinks by the excess."""
    from .budgets import predicted_bytes
    tokenizer = prepared.tokenizer
    numel = sum(u.numel for u in prepared.units)
    for attempt in range(5):
        plan = plan_for(table, config, prepared, progress=progress, budget_bits=bits)
        # recorded before counting: a folder stores the plan, this entry included
        plan.extra["size"] = {"format": config.format, "asked_bytes": size, "predicted_bytes": size,
                              "budget_bits": bits}
        predicted = predicted_bytes(prepared.model, tokenizer, plan, prepared.units, config.format)
        plan.extra["size"]["predicted_bytes"] = predicted
        if predicted <= size:
            break
        # the excess, plus a margin that grows each time: the same plan can come back for a budget cut by a few
        # hundred bytes (a folder's config lists each width's layers: its length moves with the mix)
        bits -= (predicted - size + SIZE_SLACK * 8 ** attempt) * 8 / numel
    else:
        raise BitallocError(f"no plan found under {size:,} B (the last took {predicted:,} B): give a larger size")
    return plan


def prepare_for(config: AllocateConfig, model=None, *, calibration=None, tokenizer=None) -> Prepared:
    """``prepare`` with the config's model settings, placed on ``config.device``."""
    from .models.placement import place
    loaded_here = model is None or isinstance(model, (str, os.PathLike))
    prepared = prepare(model, calibration=calibration, calib_file=config.calib, tokenizer=tokenizer,
                       options=config.specs(), include=config.include, exclude=config.exclude,
                       seq_len=config.seq_len, n_windows=config.n_windows, experts=config.experts, dtype=config.dtype,
                       held_out=CHECK_WINDOWS if config.on_model else 0)
    if config.experts_for(moe=True) != config.experts and any(u.kind in EXPERT_KINDS for u in prepared.units):
        per_layer = config.experts_for(moe=True)
        prepared.units = find_units(prepared.model, include=config.include, exclude=config.exclude, experts=per_layer)
        prepared.info = model_info(prepared.model, prepared.units)
        prepared.scope["experts"] = per_layer
    # a GGUF file's every byte is the solver's: the embedding and head are units too (a folder keeps them in 16 bits)
    if (config.size, config.memory) != (None, None) and config.format == "gguf":
        from .budgets import size_units
        include = tuple(dict.fromkeys(config.include + tuple(size_units(prepared.model))))
        prepared.units = find_units(prepared.model, include=include, exclude=config.exclude,
                                    experts=prepared.scope.get("experts", config.experts))
        prepared.info = model_info(prepared.model, prepared.units)
        prepared.scope["include"] = list(include)
    if loaded_here or config.device is not None:
        place(prepared, config.device, stream=config.stream)
    return prepared


def probe_settings_for(config: AllocateConfig) -> dict:
    return quantizer_settings(config.probe, config.quantizer, {"stream": config.stream})


def measure_for(prepared: Prepared, config: AllocateConfig, tables=None):
    """The table of ``config.probe`` on ``prepared``: from ``tables`` (an object with ``table(prepared, probe,
    settings, measure)``, the service's store) or the file cache."""
    settings = probe_settings_for(config)
    if tables is not None:
        return tables.table(prepared, config.probe, settings,
                            lambda: measure(prepared, config.probe, settings=settings, cache=False))
    return measure(prepared, config.probe, settings=settings, cache=config.cache)


def plan_for(table, config: AllocateConfig, prepared: Prepared | None = None, *, progress: bool = True,
             budget_bits: float | None = None) -> BitPlan:
    """solve → finish on ``table`` as ``config`` says. Without ``prepared`` (the service answering from a stored
    table) only plans that need no model can be made (``config.on_model`` False)."""
    if prepared is None and config.on_model:
        raise BitallocError("this plan is made on the model (a row plan, check, refine or a search solver): "
                            "prepare the model first")
    settings = config.solver_settings()
    if prepared is not None:
        settings = with_fitness(prepared, config.solver, settings, quantizer=config.quantizer)
    plan = solve(table, budget_bits or config.budget_bits, config.solver, settings=settings, count_overhead=config.count_overhead,
                 fuse=config.fuse, granularity=config.granularity)
    plan = finish(prepared, table, plan, quantizer=config.quantizer, refine=config.refine, progress=progress,
                  check=config.check, fitness=settings.get("fitness"))
    if config.target:
        plan.extra["target"] = config.target
    plan.extra["config"] = config.to_json()
    if config.by_effort:
        plan.extra["chosen"] = config.reasons()
    return plan


def quantizer_settings(probe: str, quantizer: str, settings: dict | None) -> dict:
    """Probe settings with the plan's quantizer, for the probes that can measure its damage (a probe that
    cannot measures RTN's, and a warning says so)."""
    from .sensitivity.base import takes_quantizer
    settings = dict(settings or {})
    if takes_quantizer(probe):
        settings.setdefault("quantizer", quantizer)
    elif quantizer != "rtn":
        import warnings

        from .errors import BitallocWarning
        warnings.warn(f"the {probe} probe measures the damage of RTN weights, not {quantizer}'s: --probe kfac, "
                      "output_error or measured_kl measure the quantizer's own", BitallocWarning, stacklevel=3)
    return settings


def finish(prepared: Prepared, table, plan: BitPlan, *, quantizer: str = "rtn", refine: float | None = None,
           progress: bool = True, fitness=None, check: bool = False) -> BitPlan:
    """The plan after the measured checks (alloc/finish.py): a row plan that scores worse than the layer plan on
    calibration windows falls back to it; the plan without widths below the budget's floor replaces it when
    that scores better; ``refine`` seconds of search; the quantizer is recorded. The checks run with row
    plans, ``refine`` or ``check``."""
    from . import finish as stage
    if plan.row_bits or refine or check:
        fitness = fitness if fitness is not None and getattr(fitness, "stride", 1) == stage.REFINE_STRIDE \
            else stage.fitness_for(prepared, quantizer, grams=getattr(table, "grams", None))
        try:
            plan = stage.check_rows(table, plan, fitness)
            plan = stage.check_widths(table, plan, fitness)
            if refine:
                plan = stage.refine_plan(table, plan, fitness, refine, progress=progress)
        finally:                                  # the model is borrowed: its fp weights go back
            restore = getattr(fitness, "restore", None)
            if restore:
                restore()
    plan.extra["quantizer"] = quantizer
    return plan


def with_fitness(prepared: Prepared, solver: str, settings: dict | None, max_windows: int = 16,
                 quantizer: str = "rtn") -> dict:
    """Solver settings plus, for the solvers that score plans on the model, a KL fitness on ``prepared``."""
    from .solvers.base import NEEDS_MODEL
    settings = dict(settings or {})
    if solver in NEEDS_MODEL and settings.get("fitness") is None:
        from .fitness import make_fitness
        settings["fitness"] = make_fitness(prepared, max_windows=max_windows, quantizer=quantizer)
    return settings
