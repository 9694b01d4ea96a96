"""The commands of the flow in DESIGN.md: allocate (all of it), probe, solve, eval, apply.

Each command checks every argument it can before it loads a model, so a mistake costs no waiting."""
from __future__ import annotations

import time

from .. import checks
from ..errors import BitallocError
from .common import (_discard, allocate_config, check_model_args, eval_tokens, place_model, prepare_for_plan,
                     prepare_model, print_plan, print_scores, probe_settings, resolve_solver)


def print_calibration(prepared, args) -> None:
    """What the probe calibrated on, so nobody mistakes a few windows for the 128 they asked for."""
    n, seq = prepared.tokens.shape
    source = f"{args.calib}" if args.calib else "Python's help topics (the default)"
    print(f"calibration: {n} windows × {seq} tokens = {n * seq:,} tokens of {source}")


def cmd_allocate(args) -> None:
    from ..api import run_allocate
    from ..config import TARGET_FORMAT
    checks.output_file(args.out)
    if getattr(args, "server", None):
        from .service import allocate_on_server
        return allocate_on_server(args)
    if args.budget is None and args.size is None and args.memory is None:
        raise BitallocError("give --budget BITS (per weight), --size BYTES (the whole GGUF file, with --target llama.cpp) "
                            "or --memory BYTES --context TOKENS (llama.cpp's whole footprint)")
    config = allocate_config(args)
    check_model_args(args)
    if args.baselines and not args.eval:
        raise BitallocError("--baselines scores mixes on held-out text: add --eval FILE")
    t0 = time.time()
    done = run_allocate(config, args.model, on_prepared=lambda prepared: print_calibration(prepared, args))
    plan = done.plan
    args.quantizer = done.config.quantizer             # what --eval scores with
    print_plan(plan)
    sized = plan.extra.get("size")
    if sized:
        gguf = sized.get("format", "gguf") == "gguf"
        what = "the GGUF file" if gguf else f"the {sized['format']} folder"
        planned = "embedding and head included" if gguf else "the embedding and head kept in 16 bits"
        print(f"\nsize {sized['asked_bytes']:,} B asked: {what} will take {sized['predicted_bytes']:,} B "
              f"({sized['budget_bits']:.4f} bits per planned weight, {planned})", end="")
    held = plan.extra.get("memory")
    if held:
        print(f"\nmemory {held['asked_bytes']:,} B asked at {held['context']:,} tokens: llama.cpp will hold "
              f"{held['predicted_bytes']:,} B (the GGUF {held['weights_bytes']:,}, KV cache {held['kv_type']} "
              f"{held['kv_bytes']:,}, compute and output buffers {held['compute_bytes'] + held['output_bytes']:,})",
              end="")
    print(f"\nbudget {plan.budget_bits:.6g} {'nominal' if args.nominal else 'true'} bits/weight · "
          f"true {plan.true_bpw:.4f} · nominal {plan.nominal_bpw:.4f} · probe {plan.probe} · solver {plan.solver}"
          f" · {len(plan.layers)} layers, {plan.n_params:,} weights, {plan.size_bytes() / 2**20:.2f} MiB packed")
    for line in check_lines(plan):
        print(line)
    if plan.extra.get("chosen"):
        print(effort_line(done.config, plan.extra["chosen"]))
    if "refine" in plan.extra:
        r = plan.extra["refine"]
        print(f"refine: KL on {r['kl_windows']} calibration windows {r['seed_kl']:.5f} -> {r['kl']:.5f} "
              f"({r['generations']} generations, {r['seconds']:.0f} s)")
    if args.eval:
        _evaluate_plans(args, done.prepared, done.table, plan)
    plan.save(args.out)
    print(f"plan written to {args.out} ({time.time() - t0:.1f} s)")
    if config.target:
        print(f"for {config.target}: bitalloc apply --plan {args.out} --format {TARGET_FORMAT[config.target]} --out …")


def effort_line(config, chosen: dict) -> str:
    """What --effort set, e.g. "effort balanced chose: probe kfac, quantizer gptq, 16 windows, check on"."""
    said = {"probe": f"probe {config.probe}", "quantizer": f"quantizer {config.quantizer}",
            "n_windows": f"{config.n_windows} windows", "check": f"check {'on' if config.check else 'off'}",
            "refine": f"refine {config.refine:g} s" if config.refine else "no refine"}
    why = [reason.split(": ", 1)[1] for reason in chosen.values() if ": " in reason]
    effort = config.effort if isinstance(config.effort, str) else f"{config.effort:g} s"
    return f"effort {effort} chose: {', '.join(said[k] for k in chosen)}" + "".join(f" ({w})" for w in why)


def check_lines(plan) -> list[str]:
    """What the measured checks (alloc/finish.py) decided, one line each."""
    lines = []
    rows = plan.extra.get("row_check")
    if isinstance(rows, dict):
        kept = "kept the row plan" if plan.row_bits else "returned the layer plan"
        where = "held-out calibration" if rows.get("held_out") else "calibration"
        lines.append(f"row check: KL on {rows['windows']} {where} windows, row plan {rows['row_kl']:.5f} vs layer "
                     f"plan {rows['layer_kl']:.5f}: {kept}")
    widths = plan.extra.get("width_check")
    if isinstance(widths, dict):
        early = widths.get("early", {})      # candidates far behind on the first windows, not scored on the rest

        def said(label, key, kl):
            return f"{label} {kl:.5f}" + (f" (first {early[key]} windows)" if key in early else "")
        others = ", ".join([said(k.removesuffix('_kl').replace('_', ' '), k, v)
                            for k, v in widths.items() if k.startswith("without") and k.endswith("_kl")] +
                           [said(k, k, v) for k, v in widths.get("alternatives", {}).items()])
        chosen = widths.get("chosen", "kept the plan")
        where = "held-out calibration" if widths.get("held_out") else "calibration"
        lines.append(f"check: KL on {widths['windows']} {where} windows, the plan {widths['kl']:.5f} vs "
                     f"{others}: {chosen}")
    return lines


def _evaluate_plans(args, prepared, table, plan) -> None:
    from ..api import solve
    from ..evaluate import score_plans
    tokens = eval_tokens(prepared, args.eval, args.eval_windows, prepared.tokens.shape[1])
    uniform = solve(table, plan.budget_bits, "uniform", count_overhead=not args.nominal)
    plans = [("plan", plan), (f"uniform {next(iter(uniform.layers.values())).label()}", uniform)]
    if args.baselines:
        from ..reporting.baselines import baseline_plans
        plans += [(f"llama.cpp {name}", p) for name, p in baseline_plans(args.baselines, table, getattr(prepared.model, "config", None))]
    rows = score_plans(prepared, tokens, plans, args.quantizer, getattr(args, "stream", "auto"))
    print()
    print_scores(rows, prepared.kind, tokens, args.quantizer)
    plan.extra["eval"] = {label: s.as_dict() for label, _, s in rows}
    plan.extra["eval_text"] = {"file": args.eval, "windows": len(tokens), "seq_len": int(tokens.shape[1]),
                               "quantizer": args.quantizer}


def cmd_probe(args) -> None:
    from ..api import measure
    from ..models.distributed import world
    checks.output_file(args.out)
    check_model_args(args)
    rank, size = world()
    prepared = prepare_model(args, strict=True)
    if rank == 0:
        print_calibration(prepared, args)
    t0 = time.time()
    if size > 1:                 # under torchrun: every rank measures its share, rank 0 writes
        from ..models.distributed import init, measure_distributed
        init(str(next(prepared.model.parameters()).device))
        table = measure_distributed(prepared, args.probe, probe_settings(args), cache=not args.no_cache)
        if rank != 0:
            return
    else:
        table = measure(prepared, args.probe, settings=probe_settings(args), cache=not args.no_cache)
    table.save_csv(args.out)
    source = "cache" if "cached" in table.meta else "measured"
    ranks = f", {size} ranks" if size > 1 else ""
    print(f"{args.probe}: {len(table.units)} units × {len(table.options)} options ({source}{ranks}, "
          f"{time.time() - t0:.1f} s) -> {args.out}")


def cmd_solve(args) -> None:
    from ..api import solve
    from ..sensitivity.table import SensitivityTable
    from ..registry import NEEDS_MODEL, SOLVERS
    checks.input_file(args.table, "--table", "table CSV (from bitalloc probe --out)")
    checks.output_file(args.out)
    resolve_solver(args)
    if args.granularity == "row":
        raise BitallocError("a table CSV holds one cost per layer and option, no row costs: use "
                            "`bitalloc allocate --granularity row` (the probe's cached table keeps them)")
    checks.one_of(args.solver, [s for s in SOLVERS if s not in NEEDS_MODEL], "solver for a table alone")
    table = SensitivityTable.load_csv(args.table)
    plan = solve(table, args.budget, args.solver, count_overhead=not args.nominal, fuse=args.fuse)
    print_plan(plan)
    print(f"\ntrue {plan.true_bpw:.4f} · nominal {plan.nominal_bpw:.4f} · objective {plan.objective:.6g}")
    plan.save(args.out)
    print(f"plan written to {args.out}")


def cmd_eval(args) -> None:
    from ..evaluate import score_plans
    from ..provenance import check_plan_model
    from ..plan import BitPlan
    checks.input_file(args.text, "--text", "UTF-8 text file")
    check_model_args(args)
    plan = BitPlan.load(args.plan)
    args.quantizer = args.quantizer or plan.extra.get("quantizer", "rtn")
    prepared = prepare_for_plan(args, plan)          # GPTQ calibrates on --seq-len windows, as apply does
    place_model(prepared, args, can_stream=args.quantizer == "rtn" and args.stream != "off")
    plan = check_plan_model(plan, prepared.model, prepared.units, prepared.info, force=args.force, what="eval")
    tokens = eval_tokens(prepared, args.text, args.eval_windows, args.seq_len)
    rows = score_plans(prepared, tokens, [("plan", plan)], args.quantizer, args.stream)
    print_scores(rows, prepared.kind, tokens, args.quantizer)


def cmd_apply(args) -> None:
    import copy

    from ..evaluate import perplexity
    from ..packed import apply, check_new_folder, checkpoint_bytes, checkpoint_report, planned_units, save
    from ..plan import BitPlan
    from ..files import check_space
    from ..provenance import check_plan_model
    from ..quantize_model import quantize_model
    if getattr(args, "imatrix", None) and args.format != "gguf":
        raise BitallocError("--imatrix writes llama.cpp's imatrix file: it goes with --format gguf")
    if args.format != "bitalloc":
        from .formats import apply_folder_format, apply_gguf
        return apply_gguf(args) if args.format == "gguf" else apply_folder_format(args)
    out = check_new_folder(args.out)           # fail before the slow part; save() checks again
    check_model_args(args)
    plan = BitPlan.load(args.plan)
    args.quantizer = args.quantizer or plan.extra.get("quantizer", "rtn")
    prepared = prepare_for_plan(args, plan)
    plan = check_plan_model(plan, prepared.model, prepared.units, prepared.info, force=args.force)
    check_space(out.parent, checkpoint_bytes(prepared.model, prepared.units, plan))
    place_model(prepared, args, can_stream=True)
    model, host_weights = prepared.model, prepared.compute_device is not None
    if args.eval and host_weights:
        raise BitallocError("the model does not fit the GPU, so apply quantizes it one block at a time and cannot "
                            "also hold a fake-quantized copy for --eval: score the plan with `bitalloc eval` and "
                            "apply without --eval")
    if args.eval:
        tokens = eval_tokens(prepared, args.eval, args.eval_windows, args.seq_len)
        fake = copy.deepcopy(model)
        quantize_model(fake, planned_units(fake, plan), plan, quantizer=args.quantizer, calibration=prepared.tokens,
                       sink=_discard)
        ppl_fake = perplexity(fake, tokens, desc="ppl fake-quantized")
        del fake
        ppl_device = next(model.parameters()).device
    apply(model, plan, quantizer=args.quantizer, calibration=prepared.tokens, compute_device=prepared.compute_device,
          info=prepared.info, force=True)                # checked above, before the slow part
    save(model.cpu(), out, tokenizer=prepared.tokenizer)
    r = checkpoint_report(model, out)
    print(f"packed {len(plan.layers)} layers ({r['quantized_params']:,} params at {r['true_bpw']:.4f} true bpw) "
          f"-> {args.out}\ncheckpoint {r['actual_bytes']:,} bytes; plan predicts {r['expected_bytes']:,.0f} "
          f"({100 * r['relative_diff']:+.2f} %)")
    if args.eval:
        ppl_packed = perplexity(model.to(ppl_device), tokens, desc="ppl packed")
        print(f"perplexity ({len(tokens)} windows of {tokens.shape[1]} tokens): packed {ppl_packed:.6f} · "
              f"fake-quantized {ppl_fake:.6f} · relative difference {abs(ppl_packed / ppl_fake - 1):.2e}")
