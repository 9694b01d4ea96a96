"""`bitalloc apply --format gguf|compressed-tensors|gptq`: the plan written as a llama.cpp file (alloc/ggml/),
a compressed-tensors or a GPTQ checkpoint (alloc/formats/), checked with --eval by reading the output back
through that format's own reader where it is installed."""
from __future__ import annotations

import copy
from pathlib import Path

from ..errors import BitallocError
from .common import check_model_args, eval_tokens


def apply_gguf(args) -> None:
    from ..evaluate import perplexity
    from ..files import check_parent, check_space, check_writable
    from ..ggml.checkpoint import fake_quantize, save_gguf
    from ..ggml.plan_types import plan_types
    from ..plan import BitPlan
    from .common import prepare_for_plan
    out = check_parent(args.out)
    if out.suffix != ".gguf":
        raise BitallocError(f"--out {str(out)!r}: --format gguf writes one file; give it a name ending in .gguf")
    if out.exists():
        raise BitallocError(f"{str(out)!r} exists: give a new file name (apply never overwrites a checkpoint)")
    check_writable(out.parent, try_it=True)
    imatrix = _new_file(args.imatrix, "--imatrix") if args.imatrix else None
    check_model_args(args)
    plan = BitPlan.load(args.plan)
    args.quantizer = args.quantizer or plan.extra.get("quantizer", "rtn")
    prepared = prepare_for_plan(args, plan)
    model = prepared.model
    types = plan_types(plan, prepared.units, exact=args.exact)          # refuses a row plan with --exact early
    from ..ggml.checkpoint import embedding_type
    check_space(out.parent, _estimate(model, {**types, **embedding_type(model, types, args.embedding_type)}))
    tokens = eval_tokens(prepared, args.eval, args.eval_windows, args.seq_len) if args.eval else None
    report = save_gguf(model, plan, out, tokenizer=prepared.tokenizer, calibration=prepared.tokens,
                       exact=args.exact, force=args.force, info=prepared.info, types=types,
                       embedding=args.embedding_type, imatrix=imatrix,
                       dataset=Path(args.calib).name if args.calib else "bitalloc default text",
                       quantizer=args.quantizer, keep_weights=args.eval is not None)
    mix = ", ".join(f"{t} ×{n}" for t, n in sorted(report["types"].items()))
    rest = report["bytes"] - report["tensor_bytes"]
    embedding = f"; token embedding {report['embedding']}" if report["embedding"] else ""
    print(f"wrote {sum(report['types'].values())} layers as {mix} ({args.quantizer}): {report['bpw']:.4f} bpw in ggml types "
          f"(the plan: {report['plan_bpw']:.4f} true bpw){embedding} -> {args.out}\n"
          f"file {report['bytes']:,} bytes: tensors {report['tensor_bytes']:,} + metadata and tokenizer {rest:,}")
    print_size(plan, report["bytes"], "gguf")
    if imatrix is not None:
        print(f"imatrix: {report['imatrix_entries']} tensors' input statistics over {len(prepared.tokens)} windows of "
              f"{prepared.tokens.shape[1]} tokens -> {imatrix} (llama-quantize --imatrix {imatrix})")
    if tokens is not None:
        fake = copy.deepcopy(model)
        fake_quantize(fake, report["units"], report["importance"], report["weights"])
        ppl_fake = perplexity(fake, tokens, desc="ppl fake-quantized")
        del fake
        read = read_gguf(out, next(model.parameters()).dtype)
        ppl_file = perplexity(read, tokens, desc="ppl from the gguf file")
        print(f"perplexity ({len(tokens)} windows of {tokens.shape[1]} tokens): read from the file {ppl_file:.6f} · "
              f"fake-quantized {ppl_fake:.6f} · relative difference {abs(ppl_file / ppl_fake - 1):.2e}")


def apply_folder_format(args) -> None:
    """--format compressed-tensors or gptq: a checkpoint folder of bitalloc's own codes in that layout."""
    from ..evaluate import perplexity
    from ..formats import compressed_tensors, gptq
    from ..packed import check_new_folder
    from ..plan import BitPlan
    from ..quantize_model import quantize_model
    from .common import _discard, prepare_for_plan
    writer = {"compressed-tensors": compressed_tensors, "gptq": gptq}[args.format]
    if writer is compressed_tensors:                  # before the model loads
        from ..checks import require
        require(compressed_tensors.COMPRESSED_TENSORS, None, "--format compressed-tensors", "compressed-tensors")
    out = check_new_folder(args.out)                  # fail before the slow part
    check_model_args(args)
    plan = BitPlan.load(args.plan)
    args.quantizer = args.quantizer or plan.extra.get("quantizer", "rtn")
    prepared = prepare_for_plan(args, plan)
    model = prepared.model
    tokens = eval_tokens(prepared, args.eval, args.eval_windows, args.seq_len) if args.eval else None
    extra = {"exact": args.exact} if writer is compressed_tensors else {}
    r = writer.save(model, plan, out, tokenizer=prepared.tokenizer, quantizer=args.quantizer,
                    calibration=prepared.tokens, force=args.force, info=prepared.info, **extra)
    stored = r.get("plan", plan)
    formats = sorted({s.label() for s in stored.layers.values() if not s.is_float})
    layout = r["config"]["checkpoint_format"] if "config" in r else "pack-quantized"
    print(f"wrote {len(stored.layers)} layers ({', '.join(formats)}; {args.quantizer}) as {args.format} ({layout}) -> "
          f"{args.out}\nmodel.safetensors {r['bytes']:,} bytes; its layers take {stored.true_bpw:.4f} true bpw "
          f"(the plan: {plan.true_bpw:.4f})")
    print_size(plan, sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file()), args.format)
    if tokens is None:
        return
    fake = copy.deepcopy(model)
    quantize_model(fake, prepared.units, stored, quantizer=args.quantizer, calibration=prepared.tokens,
                   sink=_discard, progress=False)
    ppl_fake = perplexity(fake, tokens, desc="ppl fake-quantized")
    del fake
    if writer is gptq:
        print(f"perplexity ({len(tokens)} windows of {tokens.shape[1]} tokens): fake-quantized {ppl_fake:.6f}; "
              "the GPTQ files are read by GPTQModel or vLLM, neither installed here: not read back")
        return
    read_back, how = compressed_tensors.read(out, next(model.parameters()).dtype)
    ppl_file = perplexity(read_back, tokens, desc="ppl from the checkpoint")
    print(f"perplexity ({len(tokens)} windows of {tokens.shape[1]} tokens): read back by {how} {ppl_file:.6f} · "
          f"fake-quantized {ppl_fake:.6f} · relative difference {abs(ppl_file / ppl_fake - 1):.2e}")


def print_size(plan, written: int, fmt: str) -> None:
    """A plan made for a size (--size): asked, predicted and written bytes (a warning when it was sized for
    another format)."""
    sized = plan.extra.get("size")
    if not sized:
        return
    if sized.get("format", "gguf") != fmt:
        print(f"size: the plan was sized for {sized.get('format', 'gguf')} ({sized['asked_bytes']:,} B); this {fmt} "
              f"output takes {written:,} B")
        return
    verdict = "as predicted" if written == sized["predicted_bytes"] else \
        f"{written - sized['predicted_bytes']:+,} B from the prediction"
    held = plan.extra.get("memory")
    if held:                            # --memory: the file's share, then the whole footprint at that context
        total = written + held["total"]
        print(f"size: the file's share of the memory asked {sized['asked_bytes']:,} B, written {written:,} B ({verdict})")
        print(f"memory: llama.cpp at {held['context']:,} tokens will hold {total:,} B of the {held['asked_bytes']:,} B "
              f"asked (the file, KV cache {held['kv_type']} {held['kv_bytes']:,} B, buffers "
              f"{held['compute_bytes'] + held['output_bytes']:,} B)")
        return
    print(f"size: asked {sized['asked_bytes']:,} B, predicted {sized['predicted_bytes']:,} B, written {written:,} B "
          f"({verdict}; {100 * written / sized['asked_bytes']:.2f} % of the size asked)")


def _new_file(path: str, flag: str) -> Path:
    from ..files import check_parent
    out = check_parent(path)
    if out.exists():
        raise BitallocError(f"{flag} {path!r} exists: give a new file name")
    return out


def read_gguf(path: Path, dtype):
    """The GGUF file as transformers' own GGUF loader reads it (dequantized through the ``gguf`` package)."""
    import transformers
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()


def _estimate(model, types: dict[str, str]) -> float:
    """About the file's bytes: each planned unit in its type, every other tensor in F16 (1-D in F32)."""
    from ..ggml.writer import nbytes, stack_type
    return sum(nbytes(tuple(p.shape), stack_type(types, name) if p.dim() == 3 else
                      types.get(name.removesuffix(".weight"), "F16" if p.dim() > 1 else "F32"))
               for name, p in model.named_parameters())
