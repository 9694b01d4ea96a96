"""llama.cpp as the peer and the judge (issue #35): llama.cpp's own imatrix mixes against bitalloc's DEFAULT
command at each mix's exact byte size, every file scored by llama.cpp's own llama-perplexity.

1. builds llama-quantize / llama-imatrix / llama-perplexity from the llama.cpp sources vendored in the
   ``llama-cpp-python`` sdist (``pip download``; cmake + a C++ compiler; cached in ~/.cache/bitalloc);
2. makes the BF16 GGUF (a .gguf source: llama-quantize --allow-requantize BF16; a Hugging Face folder: the
   vendored convert_hf_to_gguf.py), llama.cpp's imatrix on --calib, and llama.cpp's --presets with it;
3. for each preset, bitalloc's file of at most that many bytes, made by the default command a user types:
       bitalloc allocate --model M --calib C --target llama.cpp --size BYTES --out plan.json
       bitalloc apply --model M --plan plan.json --format gguf --out ours.gguf
4. scores every file with llama-perplexity on --eval (-c 512, --chunks N): on the BF16 file's tokens with
   --kl-divergence (ppl and KL to BF16), and tokenizing the text itself (plain ppl).

    python examples/bench_llamacpp.py --model /work/gemma.gguf --out examples/results/llamacpp_gemma3_270m
    python examples/bench_llamacpp.py --model ../shared/models/refllama-s --presets Q3_K_M --out /tmp/r

Gemma-3-270M's BF16 reference is the dequantized Q4_K_M GGUF (the only Gemma weights we have).
Writes OUT.md after every scored file; the work folder (--work) keeps the files, the imatrix and the logs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"                      # llama-cpp-python's sdist, which vendors llama.cpp's sources
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-tokenize")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bitalloc" / f"llama.cpp-{VERSION}"


PEAK_RSS: dict[str, float] = {}          # log name -> the command's peak resident memory, GB


def run(cmd, log: Path, **kw) -> tuple[str, float]:
    """Run one command, its output to LOG; a failure stops the benchmark with the log's tail."""
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, **kw)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    PEAK_RSS[log.stem] = usage.ru_maxrss / 1e6                   # kB on Linux
    text = log.read_text(errors="replace")
    if rc != 0:
        sys.exit(f"{Path(str(cmd[0])).name} failed (exit {rc}); last lines of {log}:\n" + "\n".join(text.splitlines()[-15:]))
    return text, time.time() - t0


def build_tools() -> Path:
    """llama.cpp's tools built once from the vendored sources; returns the folder holding them."""
    bin_dir = CACHE / "build" / "bin"
    if all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    src = CACHE / "src"
    if not (src / "CMakeLists.txt").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        print(f"downloading the llama-cpp-python {VERSION} sdist for llama.cpp's sources", flush=True)
        run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps", "--no-binary",
             ":all:", "-d", CACHE], CACHE / "download.log")
        with tarfile.open(next(CACHE.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(CACHE / "sdist", filter="data")
        shutil.move(next((CACHE / "sdist").glob("*/vendor/llama.cpp")), src)
    print("building llama.cpp's tools (cmake; about 15 minutes on 2 cores, once)", flush=True)
    run(["cmake", "-S", src, "-B", CACHE / "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
         "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        CACHE / "cmake.log")
    run(["cmake", "--build", CACHE / "build", "-j", str(os.cpu_count() or 2), "--target", *TOOLS], CACHE / "build.log")
    return bin_dir


def perplexity_figures(text: str) -> dict:
    """PPL (and mean KL, where asked) from llama-perplexity's report."""
    out = {}
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", text) or re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", text)
    if m:
        out["ppl"] = float(m.group(1))
    m = re.search(r"Mean\s+KLD:\s+([0-9.]+)", text)
    if m:
        out["kl"] = float(m.group(1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a .gguf file or a Hugging Face folder")
    ap.add_argument("--calib", default="../shared/data/calib.txt")
    ap.add_argument("--eval", default="../shared/data/eval.txt")
    ap.add_argument("--presets", default="Q2_K,Q3_K_M", help="llama.cpp's types to match, comma list")
    ap.add_argument("--chunks", type=int, default=32, help="llama-perplexity's 512-token chunks")
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", default="bench_llamacpp-work")
    ap.add_argument("--out", required=True, help="STEM: writes STEM.md")
    ap.add_argument("--extra", default="", help="more allocate flags for bitalloc's files (default: none)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tools = build_tools()
    model = Path(args.model)
    stages: dict[str, float] = {}

    bf16 = work / "bf16.gguf"
    if not bf16.exists():
        if model.suffix == ".gguf":
            _, stages["BF16 GGUF"] = run([tools / "llama-quantize", "--allow-requantize", model, bf16, "BF16"],
                                         work / "bf16.log")
        else:
            env = {**os.environ, "PYTHONPATH": str(CACHE / "src" / "gguf-py")}
            _, stages["BF16 GGUF"] = run([sys.executable, CACHE / "src" / "convert_hf_to_gguf.py", model,
                                          "--outtype", "bf16", "--outfile", bf16], work / "bf16.log", env=env)
    imatrix = work / "imatrix.gguf"
    if not imatrix.exists():
        _, stages["llama-imatrix"] = run([tools / "llama-imatrix", "-m", bf16, "-f", args.calib, "-o", imatrix,
                                          "-c", "512", "--chunks", args.imatrix_chunks, "-t", args.threads],
                                         work / "imatrix.log")
    ppl = [tools / "llama-perplexity", "-f", args.eval, "-c", "512", "--chunks", args.chunks, "-t", args.threads]
    base = work / "bf16.kld"
    rows = []

    cache_file = work / "scores.json"
    cached = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def score(label: str, path: Path, seconds: str = "") -> None:
        key = f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns} {args.chunks} {args.eval}"
        if key in cached:                                  # a file scored by an earlier run (same bytes)
            on_base, own = cached[key]
        elif label == "BF16":
            text, _ = run([*ppl, "-m", path, "--kl-divergence-base", base], work / "ppl-bf16.log")
            on_base = perplexity_figures(text)
            own = on_base
        else:
            on_base = perplexity_figures(run([*ppl, "-m", path, "--kl-divergence-base", base, "--kl-divergence"],
                                             work / f"kld-{path.stem}.log")[0])
            own = perplexity_figures(run([*ppl, "-m", path], work / f"ppl-{path.stem}.log")[0])
        cached[key] = (on_base, own)
        cache_file.write_text(json.dumps(cached, indent=1))
        rows.append({"label": label, "bytes": path.stat().st_size, "ppl": on_base.get("ppl"),
                     "kl": on_base.get("kl"), "own": own.get("ppl"), "time": seconds})
        write_table(Path(args.out + ".md"), args, rows, stages)
        print(f"{label:28s} {path.stat().st_size:>13,d} B  ppl {on_base.get('ppl')}  KL {on_base.get('kl')}  "
              f"own tokens {own.get('ppl')}", flush=True)

    score("BF16", bf16)
    for preset in [p for p in args.presets.split(",") if p]:
        theirs = work / f"llamacpp-{preset}.gguf"
        if not theirs.exists():
            _, stages[f"llama-quantize {preset}"] = run([tools / "llama-quantize", "--imatrix", imatrix, bf16, theirs,
                                                         preset, str(args.threads)], work / f"quantize-{preset}.log")
        score(f"llama.cpp imatrix {preset}", theirs)
        size = theirs.stat().st_size
        ours, plan = work / f"bitalloc-{preset}.gguf", work / f"plan-{preset}.json"
        bitalloc = [sys.executable, "-m", "bitalloc"]
        _, t_alloc = run([*bitalloc, "allocate", "--model", model, "--calib", args.calib, "--target", "llama.cpp",
                          "--size", str(size), "--out", plan, *args.extra.split()], work / f"allocate-{preset}.log")
        _, t_apply = run([*bitalloc, "apply", "--model", model, "--plan", plan, "--format", "gguf", "--out", ours,
                          "--force"], work / f"apply-{preset}.log")
        stages[f"bitalloc allocate at {preset}'s size"] = t_alloc
        stages[f"bitalloc apply at {preset}'s size"] = t_apply
        if ours.stat().st_size > size:
            sys.exit(f"bitalloc's file is {ours.stat().st_size:,d} B, larger than {preset}'s {size:,d} B")
        score(f"bitalloc at {preset}'s size", ours, f"{t_alloc:.0f} + {t_apply:.0f} s")


def write_table(path: Path, args, rows: list[dict], stages: dict) -> None:
    fp = rows[0]["ppl"]
    lines = [f"# llama.cpp judges: {args.model}", "",
             f"`python examples/bench_llamacpp.py --model {args.model} --presets {args.presets} --chunks {args.chunks}"
             f"{' --extra ' + repr(args.extra) if args.extra else ''}`", "",
             f"Every figure from llama.cpp's llama-perplexity (-c 512, --chunks {args.chunks}) on {args.eval}: `ppl` and "
             "`KL` on the BF16 file's tokens (--kl-divergence), `ppl (own tokens)` with the file's tokenizer on the "
             "text. `excess` = ppl − BF16's; `× llama.cpp` = bitalloc's excess over the llama.cpp file's it matches. "
             "bitalloc's files come from the default command (no quality flags): "
             "`bitalloc allocate --model M --calib C --target llama.cpp --size <the llama.cpp file's bytes>`, then "
             "`bitalloc apply --format gguf`."
             + (" BF16 is the source .gguf dequantized (`llama-quantize --allow-requantize SRC BF16`)."
                if str(args.model).endswith(".gguf") else "")
             + " A later size reuses the first one's sensitivity table (bitalloc's cache): its allocate skips "
             "the probe.", "",
             "| file | bytes | ppl | excess | × llama.cpp | KL | ppl (own tokens) | allocate + apply |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    theirs = None
    for r in rows:
        excess = r["ppl"] - fp if r["ppl"] is not None and fp is not None else None
        ratio = ""
        if r["label"].startswith("llama.cpp"):
            theirs = excess
        elif r["label"].startswith("bitalloc") and theirs and excess is not None:
            ratio = f"{excess / theirs:.2f}×"
        fmt = (lambda v, d: "" if v is None else f"{v:.{d}f}")
        lines.append(f"| {r['label']} | {r['bytes']:,d} | {fmt(r['ppl'], 4)} | {fmt(excess, 4)} | {ratio} | "
                     f"{fmt(r['kl'], 4)} | {fmt(r['own'], 4)} | {r['time']} |")
    lines += ["", "Wall time per stage on this machine:", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in stages.items()]
    lines += ["", "Peak resident memory per command (GB):", ""]
    lines += [f"- {k}: {v:.2f}" for k, v in PEAK_RSS.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
