"""The one-launch mixed-width kernel against the torch twin: on this CPU under TRITON_INTERPRET=1 (set by
.ci/run), on CUDA when present. Odd shapes, every mix of widths, both symmetries, GEMV and GEMM, split K;
outputs poisoned with NaN so a row never written shows."""
import itertools

import pytest
import torch
from bitalloc.kernels.qmixed import MixedQuantLinear
from bitalloc.options import QuantSpec
from bitalloc.quantize import rtn_rows

triton = pytest.importorskip("triton")
from bitalloc.kernels.triton_mixed import qmm_mixed_triton

from .triton_setup import DEVICE, TOL, needs_triton

pytestmark = needs_triton

WIDTHS = (2, 3, 4, 5, 6, 8)
MIXES = [m for r in (2, 3, 4) for m in itertools.combinations(WIDTHS, r)]      # every mix of 2 to 4 widths


def layer(mix, N, K, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    row_bits = torch.tensor(mix, dtype=torch.int8)[torch.randint(0, len(mix), (N,), generator=g)]
    row_bits[:len(mix)] = torch.tensor(mix, dtype=torch.int8)            # every width of the mix present
    row_bits = row_bits[torch.randperm(N, generator=g)]
    q = rtn_rows(torch.randn(N, K, generator=g), QuantSpec(max(mix), group, symmetric), row_bits)
    return q, MixedQuantLinear.from_quantized(q).to(DEVICE)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_both_halves_of_a_word_need_the_same_shift(bits):
    """In every plane, value i and value i + PER/2 of a word come out of one shift, one in each 16-bit half."""
    from bitalloc.kernels.pack import PLANES, pack_last_dim
    codes = torch.randint(0, 2**bits, (5, 32), generator=torch.Generator().manual_seed(bits))
    words = pack_last_dim(codes, bits).to(torch.int64) & 0xFFFFFFFF             # one block: `bits` words
    start, shift = 0, 0
    for w in PLANES[bits]:
        per, mask = 32 // w, (1 << w) - 1
        plane = (codes >> shift) & mask
        for j in range(w):
            for i in range(per // 2):
                pair = (words[:, start + j] >> (i * w)) & (mask | mask << 16)
                assert torch.equal(pair & 0xFFFF, plane[:, j * per + i])
                assert torch.equal(pair >> 16, plane[:, j * per + i + per // 2])
        start, shift = start + w, shift + w


@pytest.mark.parametrize("mix", MIXES, ids=lambda m: "w" + "".join(map(str, m)))
def test_every_mix_of_widths_gemv(mix):
    seed = hash(mix) % 2**31
    N, K = 37 + len(mix) * 11, 96
    symmetric = bool(seed % 2)
    q, m = layer(mix, N, K, 32, symmetric, seed)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, torch.float16)
    out = torch.full((1, N), float("nan"), dtype=torch.float16, device=DEVICE)
    y = qmm_mixed_triton(x, m, out=out)
    assert not torch.isnan(y).any(), "some outputs were never written"
    ref = x.float().cpu() @ q.dequantize().t()
    assert ((y.float().cpu() - ref).norm() / ref.norm()).item() < TOL[torch.float16]


@pytest.mark.parametrize("mix,N,K,group,symmetric", [((2, 4), 33, 200, 64, False), ((3, 8), 70, 100, 32, True),
                                                     ((2, 3, 4, 8), 129, 256, 128, False),
                                                     ((5, 6), 40, 64, -1, True), ((3, 4, 6), 65, 160, 32, False)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,config", [(1, {}), (1, {"SPLIT_K": 2}), (5, {"SPLIT_K": 1}), (17, {"SPLIT_K": 3})],
                         ids=["gemv", "gemv-split2", "gemm5", "gemm17-split3"])
def test_odd_shapes_match_the_twin(mix, N, K, group, symmetric, dtype, M, config):
    seed = hash((mix, N, K, M, str(dtype))) % 2**31
    q, m = layer(mix, N, K, group, symmetric, seed)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    y = qmm_mixed_triton(x, m, config=config, out=out)
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    ref = x.float().cpu() @ q.dequantize().t()
    assert ((y.float().cpu() - ref).norm() / ref.norm()).item() < TOL[dtype]
    twin = m.to("cpu")(x.cpu().float())                       # the torch twin: the fake-quantized matmul
    assert torch.allclose(twin, ref, rtol=1e-4, atol=1e-4)


def test_five_or_six_widths_fall_back_to_one_launch_per_segment():
    """The one-launch kernels take up to four widths; a layer with more still runs (and matches)."""
    mix = (2, 3, 4, 5, 6, 8)
    q, m = layer(mix, 70, 96, 32, False, 1)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.float16)
    y = m._per_segment(x)
    ref = x.float().cpu() @ q.dequantize().t()
    assert ((y.float().cpu() - ref).norm() / ref.norm()).item() < TOL[torch.float16]
    assert torch.allclose(m.to("cpu")(x.cpu().float()), ref, rtol=1e-4, atol=1e-4)
