"""Memory and time at real width: Llama-3.1-8B-, 70B- or Mixtral-8x7B-shaped models (public config values, random
weights, bf16, built locally) cut to a few decoder layers. Each depth runs two processes, as a user would:

    allocate   load -> fisher probe (block-streamed when large) -> ilp solve   (--n-windows 4 --seq-len 256)
    apply      load -> RTN quantize by the plan -> pack -> save safetensors

and reports each stage's wall time, the process's peak RSS after it (against the bf16 weight bytes) and its peak
anonymous memory (RSS less the pages of the memory-mapped weight files, which the kernel can drop); then
the per-added-layer slope (least squares over the depths) and the extrapolation to the model's full depth.

    python examples/bench_scale.py --work /tmp/scale --depths 1,2,4
    python examples/bench_scale.py --work /tmp/scale70 --shape 70b --depths 1,2
    python examples/bench_scale.py --work /tmp/scalemoe --shape mixtral --depths 1,2
    python examples/bench_scale.py --work /tmp/scale --depths 2,4 --path default   # kfac + GPTQ + check
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bitalloc.models import zoo

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "alloc" / "model-data" / "refllama-s"
GB = 1e9


def build(shape: str, depth: int, folder: Path) -> None:
    """A random-init bf16 model of ``shape`` with ``depth`` layers (refllama-s's tokenizer)."""
    import torch
    import transformers

    if (folder / "config.json").is_file():
        return
    _, family, config = SHAPES[shape]
    config_class, model_class, _ = zoo.FAMILIES[family]
    torch.set_default_dtype(torch.bfloat16)
    cfg = getattr(transformers, config_class)(**{**config, "num_hidden_layers": depth}, dtype="bfloat16")
    model = zoo.randomize_experts(getattr(transformers, model_class)(cfg))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, folder / name)


# --shape -> (folder prefix, zoo family (its transformers classes), public config values)
SHAPES = {"8b": ("llama31-8b", "llama3", zoo.LLAMA_3_1_8B),
          "70b": ("llama31-70b", "llama3", zoo.LLAMA_3_1_70B),
          "mixtral": ("mixtral-8x7b", "mixtral", zoo.MIXTRAL_8X7B)}


def layer_sizes(C: dict) -> tuple[int, int]:
    """(bf16 bytes of one decoder layer's matrices, fp32 bytes of the XᵀX GPTQ keeps for them): attention plus
    the dense MLP, or every expert's MLP and the router."""
    H, I = C["hidden_size"], C["intermediate_size"]
    kv = H * C["num_key_value_heads"] // C["num_attention_heads"]
    E = C.get("num_local_experts", 0)
    attention = 2 * H * H + 2 * H * kv
    if E:
        return 2 * (attention + E * 3 * H * I + H * E), 4 * (2 * H * H + E * (H * H + I * I))
    return 2 * (attention + 3 * H * I), 4 * (3 * H * H + I * I)   # XᵀX: q/k/v share one, o, gate/up, down


class AnonPeak:
    """The process's peak anonymous memory (RssAnon), sampled every 20 ms on a thread: RSS also counts the
    pages of memory-mapped weight files, clean pages the kernel drops when memory runs short; the anonymous
    part is what the host must really hold."""

    def __init__(self):
        self.peak = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            with open("/proc/self/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
            self.peak = max(self.peak, kb * 1024 / GB)
            time.sleep(0.02)


ANON: AnonPeak | None = None


def _peak() -> tuple[float, float]:
    """(peak RSS, peak anonymous memory) so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, ANON.peak if ANON else float("nan")


def stage_allocate(folder: str, plan: str) -> dict:
    """Run in a child process: the allocate stages, timed one by one."""
    from bitalloc.api import measure, prepare, solve
    out, t = {}, time.time()
    prepared = prepare(folder, n_windows=4, seq_len=256)
    out["load"] = (time.time() - t, *_peak())
    t = time.time()
    table = measure(prepared, "fisher", cache=False)
    out["probe"] = (time.time() - t, *_peak())
    t = time.time()
    solve(table, 3.2, "ilp").save(plan)
    out["solve"] = (time.time() - t, *_peak())
    out["streamed"] = table.meta.get("streamed")
    return out


def stage_allocate_default(folder: str, plan: str, n_windows: int) -> dict:
    """The default command's stages (`bitalloc allocate --model F --budget 3.2 --n-windows N --seq-len 256`, no
    quality flag: effort balanced = kfac probe with GPTQ's ΔW, ilp, the check), through the functions the CLI
    calls (api.run_allocate's steps), timed one by one."""
    from bitalloc.api import measure_for, plan_for, prepare_for
    from bitalloc.config import AllocateConfig
    config = AllocateConfig(budget_bits=3.2, n_windows=n_windows, seq_len=256, cache=False)
    out, t = {}, time.time()
    prepared = prepare_for(config, folder)
    config = config.for_model(moe=False)
    out["load"] = (time.time() - t, *_peak())
    t = time.time()
    table = measure_for(prepared, config)
    out[f"probe {config.probe}"] = (time.time() - t, *_peak())
    t = time.time()
    result = plan_for(table, config, prepared, progress=False)
    result.save(plan)
    out["solve+check"] = (time.time() - t, *_peak())
    out["streamed"] = table.meta.get("streamed")
    out["chosen"] = config.reasons() if config.by_effort else {}
    return out


def stage_apply_default(folder: str, plan: str, packed: str, n_windows: int) -> dict:
    """`bitalloc apply --plan P --out D`: GPTQ by the plan (the quantizer it records), pack, save."""
    from bitalloc.api import prepare
    from bitalloc.packed import apply, save
    from bitalloc.plan import BitPlan
    from bitalloc.units import planned_units
    loaded = BitPlan.load(plan)
    out, t = {}, time.time()
    prepared = prepare(folder, n_windows=n_windows, seq_len=256)
    prepared.units = planned_units(prepared.model, loaded)
    out["load "] = (time.time() - t, *_peak())
    t = time.time()
    apply(prepared.model, loaded, quantizer=loaded.extra.get("quantizer", "rtn"), calibration=prepared.tokens,
          info=prepared.info, force=True)
    save(prepared.model, packed, prepared.tokenizer)
    out[f"{loaded.extra.get('quantizer', 'rtn')}+pack"] = (time.time() - t, *_peak())
    return out


def stage_apply(folder: str, plan: str, packed: str) -> dict:
    from bitalloc.api import prepare
    from bitalloc.packed import apply, save
    from bitalloc.plan import BitPlan
    out, t = {}, time.time()
    prepared = prepare(folder, n_windows=1, seq_len=256)
    out["load "] = (time.time() - t, *_peak())
    t = time.time()
    apply(prepared.model, BitPlan.load(plan))
    save(prepared.model, packed, prepared.tokenizer)
    out["quantize+pack"] = (time.time() - t, *_peak())
    return out


def child(args) -> None:
    global ANON
    ANON = AnonPeak()
    if args.path == "default":
        result = stage_allocate_default(args.folder, args.plan, args.n_windows) if args.stage == "allocate" else \
            stage_apply_default(args.folder, args.plan, args.packed, args.n_windows)
    else:
        result = stage_allocate(args.folder, args.plan) if args.stage == "allocate" else \
            stage_apply(args.folder, args.plan, args.packed)
    print("RESULT " + json.dumps(result))


def run_stage(stage: str, folder: Path, work: Path, args) -> dict:
    packed = work / f"{folder.name}-{args.path}-packed"
    shutil.rmtree(packed, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", stage, "--folder", str(folder), "--plan",
           str(work / f"{folder.name}-{args.path}-plan.json"), "--packed", str(packed), "--path", args.path,
           "--n-windows", str(args.n_windows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"BITALLOC_CACHE": str(work / "cache"),
                                                                   **__import__("os").environ})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        raise SystemExit(f"{stage} failed on {folder}:\n{proc.stderr[-2000:]}")
    return json.loads(line[0][7:])


def print_device_estimate(C: dict, layer_bytes: int, hessians: int, rest_bytes: int) -> None:
    """GPU memory with the weights on the host (blocks streamed): an estimate from the shapes, not a
    measurement (this benchmark's figures above are host RSS)."""
    H, I = C["hidden_size"], C["intermediate_size"]
    fisher = rest_bytes + layer_bytes + 2 * layer_bytes            # resident + one block + its fp32 F
    gptq = rest_bytes + layer_bytes + hessians + 3 * 4 * max(H, I) ** 2   # + Cholesky/inverse of the largest
    print(f"\nestimated GPU memory with the weights on the host, full depth ({C['num_hidden_layers']} layers; "
          f"shapes only, not measured): fisher probe {fisher / GB:.1f} GB (embeddings + head resident "
          f"{rest_bytes / GB:.1f}, one block {layer_bytes / GB:.2f}, its fp32 Fisher {2 * layer_bytes / GB:.2f}); "
          f"GPTQ {gptq / GB:.1f} GB (+ the block's XᵀX {hessians / GB:.2f} and the largest inverse's temporaries); "
          "activations of one micro-batch come on top")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/bitalloc-scale", help="folder for the models, plans and checkpoints")
    p.add_argument("--depths", default="1,2,4")
    p.add_argument("--shape", default="8b", choices=list(SHAPES),
                   help="Llama-3.1-8B, Llama-3.1-70B or Mixtral-8x7B config values")
    p.add_argument("--path", default="fisher", choices=("fisher", "default"),
                   help="fisher: the fisher probe and RTN (the streamed path's floor); default: what `allocate` does "
                        "with no quality flag (effort balanced: kfac with GPTQ's ΔW, the check, GPTQ in apply)")
    p.add_argument("--n-windows", type=int, default=4, help="calibration windows of 256 tokens")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    p.add_argument("--packed", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.stage = args.child
        return child(args)
    C = SHAPES[args.shape][2]
    full_depth = C["num_hidden_layers"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    layer_bytes, hessians = layer_sizes(C)
    rest_bytes = 2 * 2 * C["vocab_size"] * C["hidden_size"]
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        folder = work / f"{SHAPES[args.shape][0]}-{depth}L"
        build(args.shape, depth, folder)
        a = run_stage("allocate", folder, work, args)
        b = run_stage("apply", folder, work, args)
        chosen = a.pop("chosen", None)
        rows.append((depth, a, b))
        weights = (rest_bytes + depth * layer_bytes) / GB
        print(f"\n{depth} layer(s), {weights:.2f} GB of bf16 weights (probe streamed: {a['streamed']})"
              + (f"; effort chose {chosen}" if chosen else ""))
        print(f"  {'stage':<14} {'wall s':>8} {'peak RSS GB':>12} {'× weights':>10} {'peak anon GB':>13}")
        for name, (sec, peak, anon) in [*((k, v) for k, v in a.items() if k != "streamed"), *b.items()]:
            print(f"  {name:<14} {sec:>8.1f} {peak:>12.2f} {peak / weights:>10.2f} {anon:>13.2f}")
    print_device_estimate(C, layer_bytes, hessians, rest_bytes)
    if len(rows) > 1:
        xs = [d for d, _, _ in rows]
        print(f"\nper added layer (least squares over depths {xs}); one layer is {layer_bytes / GB:.3f} GB in bf16")
        # each process's last stage (its peak so far is the process's peak)
        stages = [("allocate", 0, [k for k in rows[0][1] if k != "streamed"][-1]), ("apply", 1, list(rows[0][2])[-1])]
        for label, which, last in stages:
            peaks = [r[1 + which][last][1] for r in rows]
            anons = [r[1 + which][last][2] for r in rows]
            secs = [sum(v[0] for k, v in r[1 + which].items() if k != "streamed") for r in rows]
            for what, ys, unit in (("peak RSS", peaks, "GB"), ("peak anon", anons, "GB"), ("wall", secs, "s")):
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                base = my - slope * mx
                extra = f" = {slope * GB / layer_bytes:.2f} × one layer's bf16 bytes" if unit == "GB" else ""
                print(f"  {label:<9} {what:<9} slope {slope:.3f} {unit}/layer{extra}; at {full_depth} layers "
                      f"(the full model) {base + full_depth * slope:.1f} {unit}")


if __name__ == "__main__":
    main()
