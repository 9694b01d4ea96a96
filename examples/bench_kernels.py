"""Benchmark the Triton mixed-bitwidth kernels on a CUDA GPU (issue #5's table).

For bits x shapes (K in x N out) x M: the kernel's median time, torch's fp16 matmul on the same shape in the
same run, the speedup, and the share of the read ceiling reached. Bytes = packed codes + fp16 scales + packed
zeros (g128, asymmetric). The ceiling is a large device-to-device copy measured here: (bytes read + bytes
written) / time. Weights are rotated over enough copies to exceed the L2 cache several times.

    python examples/bench_kernels.py --out results.md      # on the GPU machine

Correctness is checked first on every (bits, shape) at M = 1 and 16 against the torch twin.
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys

import torch

from bitalloc.kernels.pack import PLANES, packed_size_bits
from bitalloc.kernels.reference import qmm_reference
from bitalloc.kernels.triton_qmm import qmm_triton

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]   # (K in, N out)
BITS = [2, 3, 4, 8]
MS = [1, 8, 16, 64]
GROUP = 128


def random_packed(K, N, bits, device):
    words_k = math.ceil(K / 32) * bits
    G = math.ceil(K / GROUP)
    info = torch.iinfo(torch.int32)
    qweight = torch.randint(info.min, info.max, (words_k, N), dtype=torch.int32, device=device)
    scales = (torch.rand(G, N, device=device) * 0.02 + 0.001).half()
    qzeros = torch.randint(info.min, info.max, (G, math.ceil(N / 32) * bits), dtype=torch.int32, device=device)
    return qweight, scales, qzeros


def graph_time(fn, calls: int) -> float:
    """Microseconds per call of ``fn``, timed as replays of a CUDA graph of ``calls`` calls, so that
    Python and launch overheads stay out of the kernel's figure (as in a served model with graphs)."""
    from triton.testing import do_bench
    fn()                                    # compile and autotune outside the graph
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3 / calls


def copy_ceiling(do_bench) -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    n = 2**30 // 2
    a = torch.randn(n, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    return 2 * n * 2 / (ms * 1e-3) / 1e9


def explore(shapes, bits_list, dtype, l2, ceiling):
    for K, N in shapes:
        for bits in bits_list:
            q_bytes = packed_size_bits(N, K, bits, GROUP, False) / 8
            n_q = max(2, math.ceil(4 * l2 / q_bytes))
            packs = [random_packed(K, N, bits, "cuda") for _ in range(n_q)]
            x = torch.randn(1, K, device="cuda", dtype=dtype)
            results = []
            for mode in ("plane", "decode", "dot"):
                for split in (1, 4, 16):
                    i = [0]

                    def run_q():
                        i[0] = (i[0] + 1) % n_q
                        qw, sc, qz = packs[i[0]]
                        return qmm_triton(x, qw, sc, qz, bits, GROUP, K, config={"MODE": mode, "SPLIT_K": split})
                    t = graph_time(run_q, max(8, n_q))
                    results.append((t, mode, split))
            results.sort()
            best = results[0]
            print(f"W{bits} {K}x{N}: best {best[1]} split {best[2]}: {best[0]:.1f} us "
                  f"({100 * q_bytes / (best[0] * 1e-6) / 1e9 / ceiling:.1f}% ceiling); " +
                  ", ".join(f"{m}/{s}={t:.1f}" for t, m, s in results[:8]), flush=True)
            del packs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table (Markdown) here too")
    ap.add_argument("--bits", default=",".join(map(str, BITS)))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=None, help="e.g. 8192x28672,4096x4096 (K x N)")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    ap.add_argument("--explore", action="store_true",
                    help="M = 1 only: time every kernel MODE x SPLIT_K and print the best, then stop")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device: run it on the GPU machine", file=sys.stderr)
        return 2
    from triton.testing import do_bench
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    bits_list = [int(b) for b in args.bits.split(",")]
    ms_list = [int(m) for m in args.ms.split(",")]
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dev = torch.cuda.get_device_properties(0)
    l2 = getattr(dev, "L2_cache_size", 50 * 2**20)
    ceiling = copy_ceiling(do_bench)
    head = (f"device: {dev.name} ({dev.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB), "
            f"torch {torch.__version__}, date {datetime.date.today()}, activations {args.dtype}, g{GROUP} asym\n"
            f"read ceiling (2 GiB device-to-device copy, read+write bytes / time): {ceiling:.0f} GB/s")
    print(head, flush=True)

    # correctness on every bits x shape, fresh random inputs, output poisoned (the kernel allocates its own)
    torch.manual_seed(0)
    worst = 0.0
    for bits in bits_list:
        for K, N in shapes:
            qw, sc, qz = random_packed(K, N, bits, "cuda")
            for M in (1, 16):
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                y = qmm_triton(x, qw, sc, qz, bits, GROUP, K)
                ref = qmm_reference(x.float(), qw, sc, qz, bits, GROUP, K)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                worst = max(worst, err if math.isfinite(err) else math.inf)
    print(f"correctness: worst relative error vs the torch twin over all bits x shapes x M in (1,16): {worst:.2e}",
          flush=True)

    if args.explore:
        explore(shapes, bits_list, dtype, l2, ceiling)
        return 0
    rows = []
    hdr = "| bits | K x N | M | kernel us | fp16 us | speedup | GB/s | % ceiling |"
    print(hdr + "\n|---|---|---|---|---|---|---|---|", flush=True)
    for K, N in shapes:
        fp_bytes = K * N * 2
        n_fp = max(2, math.ceil(4 * l2 / fp_bytes))
        w_fp = [torch.randn(N, K, device="cuda", dtype=dtype) for _ in range(n_fp)]
        for bits in bits_list:
            q_bytes = packed_size_bits(N, K, bits, GROUP, False) / 8
            n_q = max(2, math.ceil(4 * l2 / q_bytes))
            packs = [random_packed(K, N, bits, "cuda") for _ in range(n_q)]
            for M in ms_list:
                x = torch.randn(M, K, device="cuda", dtype=dtype)
                i = [0, 0]

                def run_q():
                    i[0] = (i[0] + 1) % n_q
                    qw, sc, qz = packs[i[0]]
                    return qmm_triton(x, qw, sc, qz, bits, GROUP, K)

                def run_fp():
                    i[1] = (i[1] + 1) % n_fp
                    return x @ w_fp[i[1]].t()

                calls = max(8, n_q)
                t_q = graph_time(run_q, calls)
                t_fp = graph_time(run_fp, max(8, n_fp))
                gbs = q_bytes / (t_q * 1e-6) / 1e9
                row = (bits, f"{K}x{N}", M, t_q, t_fp, t_fp / t_q, gbs, 100 * gbs / ceiling)
                rows.append(row)
                print("| {} | {} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.0f} | {:.1f} |".format(*row), flush=True)
            del packs
        del w_fp
        torch.cuda.empty_cache()

    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + f"correctness: worst relative error {worst:.2e}\n\n" + hdr +
                    "\n|---|---|---|---|---|---|---|---|\n")
            for row in rows:
                f.write("| {} | {} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.0f} | {:.1f} |\n".format(*row))
    # latency at M=16 relative to M=1, per bits x shape
    print("\nM=16 / M=1 latency:")
    by = {(r[0], r[1], r[2]): r[3] for r in rows}
    for (b, s, m), t in by.items():
        if m == 16 and (b, s, 1) in by:
            print(f"  W{b} {s}: {t / by[(b, s, 1)]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
