"""What ``allocate`` is asked to do, with every default resolved in this one place.

``AllocateConfig`` is the frozen configuration of the allocate verb. The Python API (``bitalloc.allocate``),
the CLI (``bitalloc allocate``) and the service (``POST /v1/plans`` and its jobs) only build one and call
``api.run_allocate``; none of them resolves a default of its own. The defaults that depend on other choices
are resolved in ``__post_init__``:

    solver      ilp for a layer plan, closed_form for a row plan
    target      vllm: symmetric W4/W8, fused q/k/v and gate/up, one width per layer's MoE experts;
                llama.cpp: the ggml types; transformers: symmetric formats
    search      evolutionary/optuna: generations (optuna: trials), time limit and seed
    effort      probe, quantizer, calibration windows, check and refine, where left unset (EFFORT_SETTINGS):
                fast, balanced (the default) or best; a number of seconds is balanced plus that long a refine

A plan records the resolved configuration (``plan.extra["config"]``). Errors name the setting (its field
here, ``SettingError.field``); each surface words it its own way (``--budget`` on the command line,
``field 'budget_bits'`` in the service).

This module imports nothing heavy: the CLI builds its parser from it in well under a second.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import checks
from .errors import SettingError
from .registry import NEEDS_MODEL, PROBES, ROW_PROBES, ROW_SOLVERS, SOLVERS

DEFAULT_PROBE = "fisher"
DEFAULT_SEQ_LEN = 512
DEFAULT_WINDOWS = 128
DEFAULT_GROUP_SIZE = 128
DEFAULT_GENERATIONS = 50
DEFAULT_STORAGE = "sqlite:///bitalloc-search.db"     # Optuna studies (search, --solver optuna, dashboard)
CHECK_WINDOWS = 8          # held-out calibration windows (after the probe's) on which the checks score plans
EVAL_WINDOWS = 32          # one default for every command that scores plans on held-out text

QUANTIZERS = ("rtn", "gptq")
EFFORTS = ("fast", "balanced", "best")
DEFAULT_EFFORT = "balanced"
# What each effort sets when the user leaves it unset: the path that measured best for its time (kfac measures
# the damage of the quantizer the plan is applied with; the check scores the plan against the alternatives on
# held-out calibration windows). What each costs and gives, measured: the README (effort) and the issue notes.
EFFORT_SETTINGS: dict[str, dict[str, Any]] = {
    "fast": {"probe": "kfac", "quantizer": "rtn", "n_windows": 8, "check": False},
    "balanced": {"probe": "kfac", "quantizer": "gptq", "n_windows": 16, "check": True},
    "best": {"probe": "kfac", "quantizer": "gptq", "n_windows": 64, "check": True, "refine": 600.0},
}
EFFORT_FIELDS = ("probe", "quantizer", "n_windows", "check", "refine")
# probes that cannot see what each MoE expert receives: a MoE model takes this one instead, when effort chose
MOE_PROBE = "fisher"
GRANULARITIES = ("layer", "row")
EXPERTS = ("per-expert", "per-layer")
DTYPES = ("auto", "bf16", "fp16", "fp32")
STREAM_MODES = ("auto", "on", "off")

# What each serving engine runs fast (peers' users' reports; issue #22): a target chooses the options and ties.
#   vllm          the Marlin kernels take symmetric 4- and 8-bit only (W2/W3 fall back to slow kernels and
#                 asymmetric W2/W3 is not served); q/k/v and gate/up must share a scheme; so must a layer's experts
#   llama.cpp     ggml types at their true sizes (options ggml), llama.cpp's fallbacks on narrow rows
#   transformers  symmetric formats (its compressed-tensors reader takes no packed zero points)
TARGETS: dict[str, dict[str, Any]] = {
    "vllm": {"options": "4,8", "symmetric": True, "fuse": True},      # and MoE experts per layer (experts_for)
    "llama.cpp": {"options": "ggml"},
    "transformers": {"symmetric": True},
}
TARGET_FORMAT = {"vllm": "compressed-tensors", "llama.cpp": "gguf", "transformers": "compressed-tensors"}
SIZE_FORMATS = ("gguf", "compressed-tensors", "gptq")          # what --size can count

# the fields a sensitivity table depends on (the service keys its stored tables by them)
TABLE_FIELDS = ("probe", "quantizer", "options", "group_size", "symmetric", "experts", "n_windows", "seq_len",
                "dtype")
# fields that change no number of the plan: not recorded in it (by_effort is recorded as the plan's "chosen")
UNRECORDED = ("cache", "device", "by_effort")


@dataclass(frozen=True)
class AllocateConfig:
    """The settings of one allocation. Every field has its default here; ``None`` fields are resolved from the
    others in ``__post_init__`` (see the module docstring).

    budget_bits     average TRUE bits per quantized weight (codes + scales + zeros); nominal with
                    ``count_overhead=False``
    size            instead of budget_bits: the bytes of the whole output ``format`` writes (a GGUF file: its
                    token embedding and an untied head planned like any layer; a compressed-tensors or GPTQ
                    folder: every file); the flow turns it into bits per planned weight once the model is
                    loaded (alloc/budgets.py; the plan records both)
    format          the output --size counts: gguf, compressed-tensors or gptq; None: the target's
                    (TARGET_FORMAT: llama.cpp gguf, vllm and transformers compressed-tensors)
    effort          fast, balanced or best (or seconds: balanced plus that long a refine): sets the fields
                    below marked (effort) that are left None, and ``by_effort`` lists which it set
    probe           sensitivity probe (registry.PROBES) (effort)
    solver          registry.SOLVERS, or greedy for row plans; None: ilp per layer, closed_form per row
    granularity     "layer" (one width per layer) or "row" (one per output row)
    quantizer       what the plan will be applied with (rtn or gptq): the probe's costs, checks and scores use
                    it (effort)
    options         candidate widths, e.g. "2,3,4,8", "3g64", "ggml"; None: 2,3,4,8 at ``group_size``
    group_size      weights per scale along the input
    symmetric       codes without zero points
    fuse            q/k/v and gate/up share one width
    count_overhead  False: the budget counts code bits only
    experts         MoE experts: a width "per-expert" or one "per-layer"
    include         also quantize these modules (names or globs, e.g. lm_head)
    exclude         keep these modules in full precision
    target          vllm, llama.cpp or transformers: only what that engine serves fast (sets options,
                    symmetric, fuse, and vllm a MoE model's experts; a conflicting explicit value is an error)
    calib           calibration text file; None: the default text
    seq_len         calibration window length in tokens
    n_windows       calibration windows the probe measures on (effort); the check scores on CHECK_WINDOWS more
    dtype           the model's dtype on load: auto (the checkpoint's own), bf16, fp16, fp32
    stream          run the probe one decoder block at a time: auto, on, off
    check           score the plan on held-out calibration windows against the alternatives (the plan without
                    widths below the budget's floor, uniform, llama.cpp's mix for ggml options), return the
                    best (always on for a row plan, which is also checked against the layer plan, and with
                    refine) (effort)
    refine          seconds of EvoPress-style search on the model after the solver (effort)
    generations     evolutionary: generations; optuna: trials (only for those solvers)
    time_limit      evolutionary/optuna: seconds (only for those solvers)
    seed            evolutionary/optuna: random seed (only for those solvers)
    cache           read and write the table cache (changes no number; not recorded)
    device          cpu or cuda; None: cuda when available for a model loaded from a path (not recorded)
    """

    budget_bits: float | None = None
    size: Any = None                            # bytes, or text such as "240MB" (alloc/budgets.py)
    format: str | None = None                   # what size counts (SIZE_FORMATS); None: the target's
    memory: Any = None                          # bytes or text: weights + KV cache + buffers at ``context``
    context: int | None = None                  # tokens of context --memory holds (alloc/memory.py)
    kv_type: str = "f16"                        # the KV cache's type under --memory: f16, q8_0, q4_0
    batch: int = 1                              # sequences held at once under --memory
    effort: Any = DEFAULT_EFFORT
    probe: str | None = None
    solver: str | None = None
    granularity: str = "layer"
    quantizer: str | None = None
    options: Any = None                         # str, or a tuple of QuantSpec from the Python API
    group_size: int = DEFAULT_GROUP_SIZE
    symmetric: bool = False
    fuse: bool = False
    count_overhead: bool = True
    experts: str = "per-expert"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    target: str | None = None
    calib: str | None = None
    seq_len: int = DEFAULT_SEQ_LEN
    n_windows: int | None = None
    dtype: str = "auto"
    stream: str = "auto"
    check: bool | None = None
    refine: float | None = None
    generations: int | None = None
    time_limit: float | None = None
    seed: int | None = None
    cache: bool = True
    device: str | None = field(default=None, compare=False)
    by_effort: tuple[str, ...] = ()            # the fields effort set (filled in by __post_init__)

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)   # noqa: E731 (frozen: resolve once)
        self._resolve_budget(set_)
        self._resolve_effort(set_)
        checks.one_of(self.probe, list(PROBES), "probe")
        checks.one_of(self.granularity, GRANULARITIES, "granularity")
        checks.one_of(self.quantizer, QUANTIZERS, "quantizer")
        checks.one_of(self.experts, EXPERTS, "experts")
        checks.one_of(self.stream, STREAM_MODES, "stream")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise SettingError("dtype", f"unknown {{name}} {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        for name in ("seq_len", "n_windows", "group_size"):
            set_(name, checks.count(getattr(self, name), name))
        for name in ("include", "exclude"):
            set_(name, _names(getattr(self, name), name))
        set_("refine", checks.positive(self.refine, "refine", allow_none=True))
        if isinstance(self.options, list):
            set_("options", tuple(self.options))
        self._resolve_target(set_)
        if self.solver is None:
            set_("solver", default_solver(self.granularity))
        if self.granularity == "row":
            if self.solver not in ROW_SOLVERS:
                raise SettingError("solver", f"{{name}} {self.solver!r} has no row granularity: use "
                                             f"{', '.join(ROW_SOLVERS)}")
            if self.probe not in ROW_PROBES:
                raise SettingError("probe", f"the {self.probe} probe gives no per-row costs: use {{name}} "
                                            f"{', '.join(ROW_PROBES)} with granularity row")
        else:
            if self.solver == "greedy":
                raise SettingError("solver", "the greedy solver works at row granularity: set granularity row, or "
                                             "use ilp")
            checks.one_of(self.solver, list(SOLVERS), "solver")
        self._resolve_search(set_)
        if self.granularity == "row" or self.refine:
            set_("check", True)               # a row plan and a refined plan are always checked (alloc/finish.py)
            if self.check and "refine" not in self.by_effort:     # forced, not the effort's choice
                set_("by_effort", tuple(n for n in self.by_effort if n != "check"))

    def _resolve_budget(self, set_) -> None:
        if self.memory is not None or self.context is not None:
            self._resolve_memory(set_)
            return
        if self.size is None:
            if self.budget_bits is None:
                raise SettingError("budget_bits", "give {name} (bits per weight) or a size in bytes")
            set_("budget_bits", checks.budget(self.budget_bits))
            return
        from .budgets import parse_size
        set_("size", parse_size(self.size))
        fmt = self.format or TARGET_FORMAT.get(self.target)
        if fmt not in SIZE_FORMATS:
            raise SettingError("format" if self.format else "size",
                               f"{{name}} counts the bytes of a file in a format: give --format ({', '.join(SIZE_FORMATS)}) "
                               "or --target (llama.cpp: gguf; vllm, transformers: compressed-tensors)"
                               if self.format is None else f"unknown {{name}} {self.format!r}: choose one of "
                               f"{', '.join(SIZE_FORMATS)}")
        if (fmt == "gguf") != (self.target == "llama.cpp"):
            raise SettingError("format", "a GGUF file holds llama.cpp's types: --size for gguf plans with --target "
                                         "llama.cpp, and --target llama.cpp writes gguf")
        set_("format", fmt)
        if fmt == "gptq":
            set_("fuse", True)                # a GPTQ checkpoint's q/k/v and gate/up share one format (formats/gptq.py)
        if self.budget_bits is not None:
            raise SettingError("size", "give {name} or a budget in bits per weight, not both")

    def _resolve_memory(self, set_) -> None:
        """--memory at --context: a GGUF for llama.cpp whose size the model's footprint there sets (on the model)."""
        from .budgets import parse_size
        from .memory import KV_TYPES
        if self.memory is None:
            raise SettingError("context", "{name} goes with --memory (the memory to fit at that context)")
        if self.context is None:
            raise SettingError("memory", "{name} needs --context: the tokens of context it must hold")
        if self.budget_bits is not None or self.size is not None:
            raise SettingError("memory", "give {name} or --size or --budget, one of them")
        if self.target != "llama.cpp" or self.format not in (None, "gguf"):
            raise SettingError("memory", "{name} models llama.cpp's KV cache and buffers: use it with --target "
                                         "llama.cpp (or plan a file size with --size)")
        try:
            set_("memory", parse_size(self.memory))
        except SettingError as e:
            raise SettingError("memory", e.template) from None
        set_("context", checks.count(self.context, "context"))
        set_("batch", checks.count(self.batch, "batch"))
        checks.one_of(self.kv_type, list(KV_TYPES), "kv_type")
        set_("format", "gguf")

    def _resolve_effort(self, set_) -> None:
        effort = self.effort
        if isinstance(effort, str) and effort.strip().replace(".", "", 1).isdigit():
            effort = float(effort)
        if isinstance(effort, (int, float)) and not isinstance(effort, bool):
            set_("effort", checks.positive(float(effort), "effort"))
            settings = dict(EFFORT_SETTINGS["balanced"], refine=float(effort))
        elif effort in EFFORTS:
            settings = EFFORT_SETTINGS[effort]
        else:
            raise SettingError("effort", f"unknown {{name}} {effort!r}: choose fast, balanced, best or a number of "
                                         "seconds")
        chosen = set(self.by_effort)
        for name in EFFORT_FIELDS:
            if getattr(self, name) is None and name in settings:
                set_(name, settings[name])
                chosen.add(name)
        for name, default in (("check", False), ("n_windows", DEFAULT_WINDOWS)):
            if getattr(self, name) is None:
                set_(name, default)
        set_("by_effort", tuple(n for n in EFFORT_FIELDS if n in chosen))

    def for_model(self, moe: bool) -> "AllocateConfig":
        """The config for a model: effort's probe, when it cannot see MoE experts, is MOE_PROBE on a MoE model."""
        from .registry import BLIND_TO_EXPERTS
        if moe and "probe" in self.by_effort and self.probe in BLIND_TO_EXPERTS:
            return dataclasses.replace(self, probe=MOE_PROBE)
        return self

    def reasons(self) -> dict:
        """Why each effort-set field has its value (recorded in the plan)."""
        name = self.effort if isinstance(self.effort, str) else f"{self.effort:g} s"
        out = {k: f"effort {name}" for k in self.by_effort}
        settings = EFFORT_SETTINGS.get(self.effort, EFFORT_SETTINGS["balanced"])
        if "probe" in out and self.probe != settings["probe"]:
            out["probe"] += f": {settings['probe']} cannot measure MoE experts"
        return out

    def _resolve_target(self, set_) -> None:
        if self.target is None:
            return
        checks.one_of(self.target, list(TARGETS), "target")
        if self.granularity == "row":
            raise SettingError("granularity", f"target {self.target} stores one format per layer: drop {{name}} row")
        if self.target == "vllm" and self.experts != "per-expert":
            raise SettingError("experts", "target vllm plans MoE experts per layer itself: drop {name}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in TARGETS[self.target].items():
            given = getattr(self, key)
            if given not in (defaults[key], value):
                raise SettingError(key, f"target {self.target} sets {key} {value}: drop {{name}} {given}")
            set_(key, value)

    def _resolve_search(self, set_) -> None:
        """Generations, time limit and seed mean something to the search solvers only: resolved for them,
        None for the others (so a plan request does not depend on unused fields)."""
        if self.solver in NEEDS_MODEL:
            set_("generations", checks.count(self.generations if self.generations is not None
                                             else DEFAULT_GENERATIONS, "generations"))
            set_("time_limit", checks.positive(self.time_limit, "time_limit", allow_none=True))
            set_("seed", 0 if self.seed is None else int(self.seed))
        else:
            for name in ("generations", "time_limit", "seed"):
                set_(name, None)

    # -- what the flow's steps read ------------------------------------------------------------------------
    def specs(self) -> list:
        """The candidate formats (QuantSpec) of ``options``."""
        from .options import parse_options
        if isinstance(self.options, tuple):
            return list(self.options)
        return parse_options(self.options, group_size=self.group_size, symmetric=self.symmetric)

    def experts_for(self, moe: bool) -> str:
        """How a model's MoE experts are planned: vLLM's fused MoE takes one scheme per layer, so target vllm
        plans a MoE model's experts per layer; otherwise ``experts``."""
        return "per-layer" if moe and self.target == "vllm" else self.experts

    def solver_settings(self) -> dict:
        """The search solvers' own settings (their fitness on the model is added by the flow)."""
        return search_settings(self.solver, self.generations, self.time_limit, self.seed)

    @property
    def on_model(self) -> bool:
        """Whether the plan is made on the model (checks, search), not from the table alone."""
        return bool(self.check or self.refine or self.solver in NEEDS_MODEL or self.granularity == "row"
                    or self.size is not None or self.memory is not None)

    def table_fields(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in TABLE_FIELDS}

    def to_json(self) -> dict:
        """The resolved configuration as recorded in a plan (``plan.extra["config"]``)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in UNRECORDED}

    @classmethod
    def from_fields(cls, fields: dict) -> "AllocateConfig":
        """A config from a request's fields (unknown names refused in one line)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise SettingError(unknown[0], f"unknown setting {{name}}: known are {', '.join(sorted(known))}")
        return cls(**fields)


def search_settings(solver: str, generations: int | None, time_limit: float | None, seed: int | None) -> dict:
    """The settings a search solver takes, by its own names (optuna: trials and timeout); {} for the others."""
    generations = DEFAULT_GENERATIONS if generations is None else generations
    seed = 0 if seed is None else seed
    if solver == "evolutionary":
        return {"generations": generations, "time_limit": time_limit, "seed": seed}
    if solver == "optuna":
        return {"n_trials": generations, "timeout": time_limit, "seed": seed}
    return {}


def default_solver(granularity: str) -> str:
    """ilp for a layer plan (exact), closed_form for a row plan (millions of rows)."""
    return "closed_form" if granularity == "row" else "ilp"


def _names(value, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not all(isinstance(v, str) for v in value):
        raise SettingError(name, f"{{name}} must be module names, got {value!r}")
    return tuple(v.strip() for v in value if v.strip())


def _jsonable(value):
    if isinstance(value, tuple):
        return [v.to_json() if hasattr(v, "to_json") else v for v in value]
    return value
