"""Mixed-width layer vs uniform layer at the same average bits, on a CUDA GPU (issue #12; goal: within 5 %).

For each shape (K in × N out) and M: the one-launch mixed kernel on a layer whose rows are half 2-bit and half
4-bit (3 bits on average) against QuantLinear's kernel on the same layer at uniform 3 bits, and a 3/4 mix
against uniform 4 bits (the mix is cheaper in bytes). CUDA-graph timing as in bench_kernels.py.

    python examples/bench_mixed_kernel.py --out mixed.md      # on the GPU machine

Not run yet: no GPU was lent to the session that wrote it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bitalloc.kernels.qlinear import QuantLinear
from bitalloc.kernels.qmixed import MixedQuantLinear
from bitalloc.options import QuantSpec
from bitalloc.quantize import rtn, rtn_rows

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernels import graph_time  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
MIXES = [((2, 4), 3), ((3, 4), 4)]          # (widths of the mixed layer, width of the uniform layer)


def layers(K: int, N: int, mix, uniform: int):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(N, K, generator=g) * 0.02
    row_bits = torch.tensor(mix, dtype=torch.int8).repeat_interleave(N // len(mix))
    row_bits = torch.cat([row_bits, row_bits.new_full((N - row_bits.numel(),), mix[-1])])
    row_bits = row_bits[torch.randperm(N, generator=g)]
    mixed = MixedQuantLinear.from_quantized(rtn_rows(W, QuantSpec(max(mix)), row_bits)).cuda()
    flat = QuantLinear.from_quantized(rtn(W, QuantSpec(uniform))).cuda()
    return mixed, flat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table (Markdown) here too")
    ap.add_argument("--ms", default="1,16")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_mixed_kernel: needs a CUDA GPU (this machine has none)", file=sys.stderr)
        return 2
    lines = ["| K × N | M | mixed widths | mixed µs | uniform | uniform µs | mixed / uniform |", "|---|---|---|---|---|---|---|"]
    for K, N in SHAPES:
        for mix, uniform in MIXES:
            mixed, flat = layers(K, N, mix, uniform)
            for M in (int(m) for m in args.ms.split(",")):
                x = torch.randn(M, K, device="cuda", dtype=torch.float16)
                ref = x.float() @ mixed.dequantized().cuda().t()
                got = mixed(x).float()
                assert ((got - ref).norm() / ref.norm()).item() < 3e-3, "mixed kernel disagrees with its twin"
                t_mixed, t_flat = graph_time(lambda: mixed(x), 20), graph_time(lambda: flat(x), 20)
                lines.append(f"| {K}×{N} | {M} | {'/'.join(map(str, mix))} | {t_mixed:.1f} | W{uniform} | "
                             f"{t_flat:.1f} | {t_mixed / t_flat:.2f} |")
                print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
