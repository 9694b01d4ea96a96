"""The ``bitalloc`` argument parser: one sub-parser per command, every value type-checked by argparse."""
from __future__ import annotations

import argparse
import sys

from .common import (add_dtype_arg, add_eval_windows, add_model_args, add_search_solver_args, add_solver_args,
                     add_target_arg, budget_type, count_type, effort_type, seconds_type)
from .explore import cmd_dashboard, cmd_search, cmd_sweep
from .flow import cmd_allocate, cmd_apply, cmd_eval, cmd_probe, cmd_solve
from .publish import cmd_export, cmd_report
from .service import add_service_commands

BASELINES = ["llama.cpp"]

# one example per command, shown at the end of its --help
EXAMPLES = {
    "allocate": "bitalloc allocate --budget 3.2 --out plan.json\n"
                "  bitalloc allocate --model ./my-model --budget 4.5 --target llama.cpp --out plan.json\n"
                "  bitalloc allocate --model ./my-model --size 240MB --target llama.cpp --out plan.json",
    "probe": "bitalloc probe --probe kfac --out kfac.csv",
    "solve": "bitalloc solve --table kfac.csv --budget 3.2 --out plan.json",
    "eval": "bitalloc eval --plan plan.json --text held-out.txt",
    "apply": "bitalloc apply --plan plan.json --format gguf --out model.gguf",
    "search": "bitalloc search --study s1 --budget 3.2 --n-trials 40 --out plan.json",
    "export": "bitalloc export plan.json --to llama.cpp --out tensor-types.txt",
    "sweep": "bitalloc sweep --budgets 2.5,3,3.5,4 --out-dir sweep",
    "report": "bitalloc report plan.json --out report.html",
    "dashboard": "bitalloc dashboard --storage sqlite:///bitalloc-search.db",
    "serve": "bitalloc serve --models-root ./models",
    "worker": "bitalloc worker --store postgresql://bitalloc@db-host/bitalloc",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``bitalloc: error: …`` line (exit status 2), like every other
    mistake; ``--help`` still shows the usage."""

    def error(self, message: str):
        print(f"bitalloc: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def add_fuse_nominal(p) -> None:
    p.add_argument("--fuse", action="store_true", help="q/k/v and gate/up share one width")
    p.add_argument("--nominal", action="store_true", help="the budget counts code bits only (no scales or zeros)")


def add_window_args(p) -> None:
    p.add_argument("--seq-len", type=count_type, default=None,
                   help="calibration window length in tokens (default: the plan's own, else 512)")
    p.add_argument("--n-windows", type=count_type, default=None,
                   help="GPTQ calibration windows (default: the plan's own, else 128)")


def add_force_arg(p, verb: str) -> None:
    p.add_argument("--force", action="store_true", help=f"{verb} a plan made for another model (its hash or weights "
                   "differ) anyway; the output's plan.json records it")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..config import DEFAULT_EFFORT, DEFAULT_PROBE
    from ..memory import KV_TYPES
    from ..registry import PROBES
    PROBE_NAMES = list(PROBES)
    from ..config import DEFAULT_STORAGE
    parser = OneLineParser(prog="bitalloc", description="Mixed-precision bit allocation under a memory budget.")
    parser.add_argument("--version", action="version", version=f"bitalloc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("allocate", help="probe, solve and write a plan (the whole flow)")
    add_model_args(p, windows=None)
    p.add_argument("--budget", type=budget_type, default=None, help="average TRUE bits per weight (codes+scales+zeros)")
    p.add_argument("--size", default=None, metavar="BYTES",
                   help="instead of --budget: the whole output at most this big, e.g. 240MB, 0.25GB, 230MiB: a GGUF "
                        "file (--target llama.cpp; the token embedding and head are planned like any layer) or a "
                        "compressed-tensors / GPTQ folder (--target vllm|transformers, or --format)")
    p.add_argument("--format", default=None, choices=["gguf", "compressed-tensors", "gptq"],
                   help="the output --size counts (default: the target's; apply then writes this format)")
    p.add_argument("--memory", default=None, metavar="BYTES",
                   help="instead of --budget: what llama.cpp may hold in all at --context tokens, e.g. 1GiB: the "
                        "GGUF file, its KV cache and its compute and output buffers (--target llama.cpp)")
    p.add_argument("--context", type=count_type, default=None, metavar="TOKENS",
                   help="with --memory: the context length the memory must hold")
    p.add_argument("--kv-type", default="f16", choices=list(KV_TYPES),
                   help="with --memory: llama.cpp's KV cache type (its -ctk/-ctv; default f16)")
    p.add_argument("--batch", type=count_type, default=1, metavar="N",
                   help="with --memory: sequences held at once, each with --context tokens (default 1)")
    p.add_argument("--effort", type=effort_type, default=DEFAULT_EFFORT, metavar="fast|balanced|best|SECONDS",
                   help="how much work buys quality: sets --probe, --quantizer, --n-windows, --check and --refine "
                        "where you leave them out (fast: kfac, rtn, 8 windows, no check; balanced: kfac, gptq, 16 "
                        "windows, check; best: 64 windows and a 600 s refine; SECONDS: balanced plus that long a "
                        f"refine; default {DEFAULT_EFFORT})")
    p.add_argument("--probe", default=None, choices=PROBE_NAMES,
                   help="sensitivity probe (default: the effort's, kfac; fisher on MoE models)")
    add_solver_args(p)
    p.add_argument("--quantizer", default=None, choices=["rtn", "gptq"],
                   help="what the plan will be applied with: the probe's costs (kfac, output_error, measured_kl), "
                        "the checks, --refine and --eval use it (default: the effort's, gptq; fast: rtn)")
    p.add_argument("--refine", type=seconds_type, default=None, metavar="SECONDS",
                   help="after the solver, search this many seconds for a plan with a lower KL to the fp model "
                        "on calibration windows (EvoPress-style; layer and row plans)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                   help="score the plan on held-out calibration windows against the plan without widths below the "
                        "budget's floor, uniform and (ggml options) llama.cpp's mix at the budget, and return the "
                        "best (default: the effort's, on; fast: off; always on with --granularity row or --refine)")
    p.add_argument("--fuse", action="store_true", help="q/k/v and gate/up share one width")
    add_target_arg(p)
    p.add_argument("--nominal", action="store_true", help="budget counts code bits only (count_overhead=False)")
    p.add_argument("--eval", help="text file: report perplexity of fp, the plan and the best uniform plan")
    add_eval_windows(p)
    p.add_argument("--baselines", choices=BASELINES, help="with --eval: also score llama.cpp's Q2_K, Q3_K_S, "
                   "Q3_K_M and Q4_K_M tensor-type mixes")
    p.add_argument("--out", default="plan.json", help="plan JSON to write (default plan.json)")
    add_search_solver_args(p)
    p.add_argument("--server", metavar="URL", help="ask a running `bitalloc serve` for the plan (--model is then a "
                   "registered model's id, default refllama-s); the plan comes from its stored table")
    p.add_argument("--token", help="--server: the write token (default $BITALLOC_TOKEN)")
    p.set_defaults(func=cmd_allocate)

    p = sub.add_parser("probe", help="measure a sensitivity table and write it as CSV")
    add_model_args(p)
    p.add_argument("--probe", default=DEFAULT_PROBE, choices=PROBE_NAMES, help=f"probe (default {DEFAULT_PROBE})")
    p.add_argument("--out", required=True, help="CSV to write: unit,bits,group_size,symmetric,cost,size_bits,...")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("solve", help="solve a budget from a sensitivity table CSV")
    p.add_argument("--table", required=True, help="table CSV from `bitalloc probe --out`")
    p.add_argument("--budget", type=budget_type, required=True, help="average TRUE bits per weight (codes+scales+zeros)")
    add_solver_args(p)
    add_fuse_nominal(p)
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("eval", help="perplexity / KL (or embedding cosine) of a plan")
    p.add_argument("--model", help="local Hugging Face model folder or .gguf file (default: the embedded refllama-s)")
    p.add_argument("--plan", required=True, help="plan JSON (from allocate, solve or search)")
    p.add_argument("--text", required=True, help="evaluation text file")
    p.add_argument("--calib", help="calibration text for GPTQ (default: the plan's own, else Python's help topics)")
    p.add_argument("--quantizer", default=None, choices=["rtn", "gptq"],
                   help="default: the quantizer the plan was made for (its JSON records it), else rtn")
    add_window_args(p)
    add_eval_windows(p)
    add_dtype_arg(p)
    p.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="score plans one decoder block at a time (RTN, or GPTQ on calibration windows carried along) (default auto: when the whole-model copies pass "
                        "1 GiB, or the model does not fit the GPU: its weights then stay on the host)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add_force_arg(p, "score")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("apply", help="quantize and pack a model by a plan; write safetensors + plan JSON")
    p.add_argument("--model", help="local Hugging Face model folder or .gguf file (default: the embedded refllama-s)")
    p.add_argument("--plan", required=True, help="plan JSON (from allocate, solve or search)")
    p.add_argument("--out", required=True, help="new folder for the packed checkpoint (--format gguf: a new .gguf file)")
    p.add_argument("--format", default="bitalloc", choices=["bitalloc", "gguf", "compressed-tensors", "gptq"],
                   help="bitalloc: our packed safetensors (Triton kernels); gguf: a llama.cpp file, each layer in the "
                   "ggml type of its width (K-quants; llama.cpp's fallbacks on rows not a multiple of 256); "
                   "compressed-tensors: pack-quantized, for vLLM and transformers; gptq: GPTQModel/AutoGPTQ layout "
                   "with per-module `dynamic` widths, for vLLM and GPTQModel (default bitalloc)")
    p.add_argument("--embedding-type", default="Q8_0", metavar="TYPE",
                   help="--format gguf: ggml type of the token embedding when the plan leaves it out (default Q8_0, "
                   "as llama.cpp's presets store it where their K-quant does not fit; F16 keeps it)")
    p.add_argument("--imatrix", metavar="FILE",
                   help="--format gguf: also write the calibration's statistics as llama.cpp's imatrix file (GGUF "
                   "form), for llama-quantize --imatrix")
    p.add_argument("--exact", action="store_true",
                   help="--format gguf / compressed-tensors: refuse a row plan (one type per tensor) instead of rounding rows up")
    p.add_argument("--quantizer", default=None, choices=["rtn", "gptq"],
                   help="default: the quantizer the plan was made for (its JSON records it), else rtn "
                   "(--format gguf rounds by its own importance-weighted search)")
    p.add_argument("--calib", help="calibration text for GPTQ (default: the plan's own, else Python's help topics)")
    add_window_args(p)
    p.add_argument("--eval", help="text file: perplexity of the packed model and of the fake-quantized one")
    add_eval_windows(p)
    add_dtype_arg(p)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; a model that does "
                   "not fit the GPU stays on the host and is quantized one decoder block at a time on the GPU)")
    add_force_arg(p, "pack")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("search", help="run one worker of an Optuna study over plans (start several to scale out)")
    add_model_args(p)
    p.add_argument("--study", required=True, help="study name (workers with the same name share it)")
    p.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna storage URL (default {DEFAULT_STORAGE}); "
                   "postgresql://user@host/db for many machines")
    p.add_argument("--n-trials", type=count_type, default=100,
                   help="the study stops at this many complete trials (default 100)")
    p.add_argument("--budget", type=budget_type, default=None,
                   help="single objective (KL) under this budget; without it: multi-objective (true bpw, KL)")
    p.add_argument("--probe", default=DEFAULT_PROBE, choices=PROBE_NAMES,
                   help="the cost table the study starts from: reweighted (reweight space) or used to repair plans "
                        f"to the budget (widths space); its ILP plan is trial 0 (default {DEFAULT_PROBE})")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "nsga2", "random"],
                   help="Optuna sampler (default tpe; nsga2 for the multi-objective study)")
    p.add_argument("--space", choices=["reweight", "widths"], default=None,
                   help="reweight (default with --budget): per-layer multipliers on the cost table, each trial the "
                        "exact ILP plan of the reweighted table; widths (default without): one width per layer")
    p.add_argument("--spread", type=seconds_type, default=0.3,
                   help="reweight: log-multipliers lie in [-spread, spread] (default 0.3)")
    p.add_argument("--windows", type=count_type, default=4, help="calibration windows scored per trial (default 4)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's random seed (default 0)")
    add_fuse_nominal(p)
    p.add_argument("--heartbeat", type=count_type, default=10, help="seconds between heartbeats (default 10)")
    p.add_argument("--grace", type=count_type, default=30,
                   help="a trial whose worker is silent this long is failed and retried (default 30)")
    p.add_argument("--timeout", type=seconds_type, default=None, help="stop this worker after this many seconds")
    p.add_argument("--trial-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--out", help="write the best plan (single-objective studies)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="write a plan as another tool's config")
    p.add_argument("plan", help="plan JSON (from allocate, solve or search)")
    p.add_argument("--to", required=True, help="gptqmodel, llama.cpp or compressed-tensors")
    p.add_argument("--embedding-type", default="Q8_0", metavar="TYPE",
                   help="--to llama.cpp: ggml type of the token embedding when the plan leaves it out (default Q8_0, "
                   "as llama.cpp's presets store it where their K-quant does not fit; F16 keeps it)")
    p.add_argument("--exact", action="store_true",
                   help="refuse a row plan (widths inside a layer) instead of rounding each layer up to its widest row")
    p.add_argument("--out", required=True, help="config file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sweep", help="solve many budgets from one (cached) table; CSV + Pareto plot")
    add_model_args(p)
    p.add_argument("--budgets", default="2.25:4.25:0.25", help="START:STOP:STEP or a comma list (default 2.25:4.25:0.25)")
    p.add_argument("--probe", default=DEFAULT_PROBE, choices=PROBE_NAMES,
                   help=f"sensitivity probe (default {DEFAULT_PROBE})")
    add_solver_args(p)
    add_fuse_nominal(p)
    p.add_argument("--eval", help="text file: perplexity of every plan and of the uniform plans (Pareto plot)")
    add_eval_windows(p)
    p.add_argument("--baselines", choices=BASELINES, help="with --eval: also score llama.cpp's Q2_K, Q3_K_S, "
                   "Q3_K_M and Q4_K_M tensor-type mixes (rows in the CSV, triangles on the plot)")
    p.add_argument("--out-dir", default="sweep", help="folder for sweep.csv and pareto.png (default ./sweep)")
    add_search_solver_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="an HTML (or, for --out x.md, Markdown) page with the plan's summary, "
                                      "charts and per-layer table")
    p.add_argument("plan", help="plan JSON to report on")
    p.add_argument("--table", help="a probe table CSV, for the cost heat map")
    p.add_argument("--out", default="report.html",
                   help="page to write (default report.html); a .md name writes Markdown with the charts beside it")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard on a study storage")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help=f"the study storage `bitalloc search` wrote (default {DEFAULT_STORAGE})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    add_service_commands(sub)
    for name, command in sub.choices.items():
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        command.epilog = f"example:\n  {EXAMPLES[name]}"
    return parser
