"""What several commands share: argument groups, the up-front checks of the model/calibration arguments,
preparing the model on its device, and the plan and score tables they print."""
from __future__ import annotations

import argparse

from .. import checks
from ..errors import BitallocError

from ..config import EVAL_WINDOWS


# -- argparse value types: a bad value is one `bitalloc: error:` line (see parser.OneLineParser) ------------
def _argtype(convert, check, not_a: str):
    """An argparse type: ``convert`` the text (ValueError -> "not_a"), then ``check`` it (BitallocError ->
    its message); both become argparse errors, printed as one line."""
    def parse(text: str):
        try:
            return check(convert(text))
        except BitallocError as e:
            raise argparse.ArgumentTypeError(str(e).replace("budget_bits", "budget")) from None
        except ValueError:
            raise argparse.ArgumentTypeError(not_a.format(text=text)) from None
    return parse


budget_type = _argtype(float, checks.budget, "budget {text!r} is not a number of bits per weight, e.g. 3.2")
count_type = _argtype(int, lambda v: checks.count(v, "the value"), "{text!r} is not a whole number ≥ 1")
seconds_type = _argtype(float, lambda v: checks.positive(v, "the value"), "{text!r} is not a number of seconds")


def effort_type(text: str):
    """--effort: fast, balanced, best, or seconds."""
    from ..config import EFFORTS
    if text in EFFORTS:
        return text
    try:
        return seconds_type(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"effort {text!r}: choose fast, balanced, best or a number of seconds") from None


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype to load the model in (default auto: the checkpoint's own)")


def add_eval_windows(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-windows", type=count_type, default=EVAL_WINDOWS,
                   help=f"held-out windows to score (default {EVAL_WINDOWS}, the same for every command)")


def add_model_args(p: argparse.ArgumentParser, windows: int | None = 128) -> None:
    p.add_argument("--model", help="local Hugging Face model folder or .gguf file (default: the embedded refllama-s)")
    p.add_argument("--calib", help="calibration text file (default: Python's own help topics)")
    p.add_argument("--options", help="candidate widths, e.g. 2,3,4,8 or 3g64 (default 2,3,4,8 at --group-size); ggml: llama.cpp's "
                   "Q2_K…Q6_K and Q8_0 at their true sizes, for apply --format gguf")
    p.add_argument("--group-size", type=count_type, default=128, help="weights per scale along the input (default 128)")
    p.add_argument("--symmetric", action="store_true", help="symmetric codes (no zero points)")
    p.add_argument("--include", default="", help="also quantize these modules (comma list of names or globs, e.g. "
                   "lm_head; default: the decoder's Linear layers)")
    p.add_argument("--exclude", default="", help="keep these modules in full precision (comma list of names or globs; "
                   "default: none)")
    p.add_argument("--experts", default="per-expert", choices=["per-expert", "per-layer"],
                   help="MoE models: a width per expert, or one per layer for all its experts (default per-expert)")
    add_dtype_arg(p)
    p.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="run the probe one decoder block at a time (hessian_trace: a block-local estimate) (default auto: "
                        "when the whole-model state would pass 1 GiB, or the weights stay on the host for a GPU)")
    p.add_argument("--seq-len", type=count_type, default=512, help="calibration window length in tokens (default 512)")
    p.add_argument("--n-windows", type=count_type, default=windows,
                   help=f"calibration windows (default {windows})" if windows else
                   "calibration windows the probe measures on (default: the effort's, 16; fast 8, best 64); the "
                   "check scores on 8 more")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the sensitivity-table cache")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def add_search_solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generations", type=count_type, default=50,
                   help="evolutionary: generations (optuna: trials) (default 50)")
    p.add_argument("--time-limit", type=seconds_type, default=None,
                   help="evolutionary/optuna: stop after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="random seed of the search solvers (default 0)")


def add_solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--solver", default=None, help="ilp, closed_form, uniform, evolutionary, optuna; with "
                   "--granularity row: closed_form, greedy or ilp (default ilp per layer, closed_form per row)")
    p.add_argument("--granularity", default="layer", choices=["layer", "row"],
                   help="one width per layer, or per output row (plan JSON v2, needs a probe with row costs: "
                        "fisher, kfac, output_error) (default layer)")


def add_target_arg(p: argparse.ArgumentParser) -> None:
    from ..config import TARGETS
    p.add_argument("--target", choices=list(TARGETS), default=None,
                   help="choose only what this engine serves fast: vllm (symmetric W4/W8, fused q/k/v and gate/up, "
                        "one width per layer's experts), llama.cpp (ggml types), transformers (symmetric formats)")


def resolve_solver(args) -> None:
    """--solver's default depends on --granularity (config.default_solver, as for allocate)."""
    from ..config import default_solver
    if getattr(args, "granularity", None) is not None and args.solver is None:
        args.solver = default_solver(args.granularity)


# the flag of each AllocateConfig field whose flag is not --FIELD (SettingError names the field)
FLAGS = {"budget_bits": "--budget", "count_overhead": "--nominal", "cache": "--no-cache"}


def flag_for(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def allocate_config(args):
    """The AllocateConfig of `bitalloc allocate`'s arguments: every default resolved there, not here."""
    from ..config import AllocateConfig
    return AllocateConfig(
        budget_bits=args.budget, size=args.size, format=getattr(args, "format", None), memory=args.memory,
        context=args.context, kv_type=args.kv_type, batch=args.batch, effort=args.effort, probe=args.probe, solver=args.solver, granularity=args.granularity,
        quantizer=args.quantizer, options=args.options, group_size=args.group_size, symmetric=args.symmetric,
        fuse=args.fuse, count_overhead=not args.nominal, experts=args.experts, include=split_list(args.include),
        exclude=split_list(args.exclude), target=args.target, calib=args.calib, seq_len=args.seq_len,
        n_windows=args.n_windows, dtype=args.dtype, stream=args.stream, check=args.check, refine=args.refine,
        generations=args.generations, time_limit=args.time_limit, seed=args.seed, cache=not args.no_cache,
        device=args.device)


def split_list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


# -- up-front checks ----------------------------------------------------------------------------------------
def check_model_args(args) -> None:
    """Everything about the model/calibration arguments that can be checked without loading the model."""
    from ..options import parse_options
    from ..registry import PROBES, ROW_PROBES
    if getattr(args, "model", None):
        from ..models.loading import check_model_path
        check_model_path(args.model)
    if getattr(args, "calib", None):
        checks.input_file(args.calib, "--calib", "UTF-8 text file")
    if getattr(args, "probe", None) is not None:
        checks.one_of(args.probe, list(PROBES), "probe")
        if getattr(args, "granularity", "layer") == "row" and args.probe not in ROW_PROBES:
            raise BitallocError(f"the {args.probe} probe gives no per-row costs: use --probe "
                                f"{', '.join(ROW_PROBES)} with --granularity row")
    resolve_solver(args)
    if getattr(args, "solver", None) is not None:
        from ..registry import ROW_SOLVERS, SOLVERS
        if getattr(args, "granularity", "layer") == "row":
            checks.one_of(args.solver, ROW_SOLVERS, "solver", why="for --granularity row")
        else:
            checks.one_of(args.solver, list(SOLVERS), "solver")
    if hasattr(args, "options"):
        options = parse_options(args.options, group_size=args.group_size, symmetric=args.symmetric)
        if getattr(args, "budget", None) is not None:
            checks.feasible(args.budget, options, count_overhead=not getattr(args, "nominal", False))
    if getattr(args, "device", None) and not args.device.split(":")[0] in ("cpu", "cuda"):
        raise BitallocError(f"--device {args.device!r} is not understood: use cpu or cuda")
    if getattr(args, "eval", None):
        checks.input_file(args.eval, "--eval", "UTF-8 text file")


def probe_settings(args) -> dict:
    """--stream: every probe can run one decoder block at a time."""
    return {"stream": args.stream}


# -- the work ------------------------------------------------------------------------------------------------
def prepare_model(args, strict: bool = False):
    """Load the model, find its units, tokenize the calibration text; place the model on its device."""
    from ..api import prepare
    from ..options import parse_options
    options = parse_options(args.options, group_size=args.group_size, symmetric=args.symmetric)
    prepared = prepare(args.model, calib_file=args.calib, options=options, include=split_list(args.include),
                       seq_len=args.seq_len, n_windows=args.n_windows, strict_windows=strict, experts=args.experts,
                       exclude=split_list(args.exclude), dtype=args.dtype)
    can_stream = getattr(args, "probe", None) is not None and getattr(args, "stream", "auto") != "off"
    place_model(prepared, args, can_stream)
    return prepared


def place_model(prepared, args, can_stream: bool) -> None:
    """models/placement.place with --device and --stream (a stage that cannot stream gets "off")."""
    from ..models.placement import place
    place(prepared, getattr(args, "device", None), stream=getattr(args, "stream", "auto") if can_stream else "off")


def _discard(name, q) -> None:
    """quantize_model sink for fake quantization only: the codes are not needed."""


def plan_calibration(args, plan) -> None:
    """--calib, --n-windows and --seq-len left out: the calibration the plan was made with (its recorded config),
    so GPTQ calibrates on what the probe measured; a recorded file that is not here falls back to the default
    text, with a warning."""
    import warnings
    from pathlib import Path

    from ..config import DEFAULT_SEQ_LEN, DEFAULT_WINDOWS
    from ..errors import BitallocWarning
    recorded = plan.extra.get("config") if isinstance(plan.extra.get("config"), dict) else {}
    if args.calib is None and recorded.get("calib"):
        if Path(recorded["calib"]).is_file():
            args.calib = recorded["calib"]
        else:
            warnings.warn(f"the plan was calibrated on {recorded['calib']!r}, which is not here: calibrating on the "
                          "default text (give --calib)", BitallocWarning, stacklevel=2)
    args.n_windows = args.n_windows or recorded.get("n_windows") or DEFAULT_WINDOWS
    args.seq_len = args.seq_len or recorded.get("seq_len") or DEFAULT_SEQ_LEN


def plan_model(args, plan) -> None:
    """--model left out: the model the plan was made from (its recorded path), when that is a local path here
    (else the embedded model, which the plan's fingerprint then refuses if it is another)."""
    import sys
    from pathlib import Path
    if getattr(args, "model", None) is not None:
        return
    recorded = plan.model.get("path") if isinstance(getattr(plan, "model", None), dict) else None
    if recorded and Path(recorded).exists():
        args.model = recorded
        print(f"model: {recorded} (the plan's; --model for another)", file=sys.stderr)


def prepare_for_plan(args, plan):
    """The model of ``args`` with the units the plan was made with (its include/exclude/experts; every one
    planned, units.planned_units), calibrated on --n-windows × --seq-len tokens of --calib (by default the
    plan's own calibration: ``plan_calibration``)."""
    from ..api import prepare
    from ..units import planned_units
    plan_model(args, plan)
    plan_calibration(args, plan)
    scope = plan.extra.get("scope") if isinstance(plan.extra.get("scope"), dict) else {}
    prepared = prepare(args.model, calib_file=args.calib, n_windows=args.n_windows, seq_len=args.seq_len,
                       dtype=args.dtype, experts=scope.get("experts", plan.extra.get("experts", "per-expert")),
                       exclude=tuple(scope.get("exclude", ())), include=tuple(scope.get("include", ())))
    prepared.units = planned_units(prepared.model, plan)
    return prepared


def solver_settings(args, prepared) -> dict:
    """--generations/--time-limit/--seed for the search solvers, plus their KL fitness on the model."""
    from ..api import with_fitness
    from ..config import search_settings
    settings = search_settings(args.solver, args.generations, args.time_limit, args.seed)
    return with_fitness(prepared, args.solver, settings, quantizer=getattr(args, "quantizer", None) or "rtn")


def eval_tokens(prepared, path: str, n_windows: int, seq_len: int):
    """Held-out windows from ``path`` (fewer than asked is a warning, the count is printed with the scores)."""
    from ..calibration import read_text, windows
    return windows(prepared.tokenizer, read_text(path), seq_len=seq_len, n_windows=n_windows,
                   source=f"eval file {path!r}")


def print_plan(plan) -> None:
    print("\n".join(plan.table_lines()))


def print_scores(rows, kind: str, tokens, quantizer: str) -> None:
    """One line per (label, plan or None for fp, Score): true bpw, perplexity (or cosine) and KL to fp."""
    metric = "ppl" if kind == "causal_lm" else "cosine"
    width = max(18, *(len(label) for label, _, _ in rows))
    print(f"{'model':<{width}} {'true bpw':>9} {metric:>9} {'KL':>8}   ({len(tokens)} windows of {tokens.shape[1]} "
          f"tokens, {quantizer})")
    for label, p, s in rows:
        bpw = f"{p.true_bpw:.4f}" if p else "16"
        value = s.ppl if metric == "ppl" else s.cosine
        kl = f"{s.kl:.5f}" if s.kl is not None else "-"
        print(f"{label:<{width}} {bpw:>9} {value:>9.4f} {kl:>8}")
