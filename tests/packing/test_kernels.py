"""Triton kernels against the torch twin: on this CPU under TRITON_INTERPRET=1 (set by .ci/run), on CUDA when
present. Fresh random inputs for every case; outputs are poisoned with NaN before each run."""

import pytest
import torch
from bitalloc.kernels.pack import pack_last_dim, pack_weight
from bitalloc.kernels.reference import dequantize_packed, qmm_reference
from bitalloc.options import QuantSpec
from bitalloc.quantize import rtn

triton = pytest.importorskip("triton")
from bitalloc.kernels.triton_qmm import qmm_triton

from .triton_setup import DEVICE, HAS_CUDA, TOL, needs_triton

pytestmark = needs_triton


def packed(N, K, bits, group, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    q = rtn(W, QuantSpec(bits, group, symmetric))
    qz = None if symmetric else pack_last_dim(q.zeros.t().contiguous(), bits).to(DEVICE)
    return q, pack_weight(q.codes, bits).to(DEVICE), q.scales.t().contiguous().half().to(DEVICE), qz


CASES = [  # (bits, N, K, group, symmetric)
    (2, 48, 200, 64, False), (3, 64, 256, 128, False), (3, 40, 96, 32, True), (4, 48, 200, 128, False),
    (4, 33, 64, -1, True), (5, 32, 128, 64, False), (6, 32, 64, 32, True), (8, 48, 100, 32, False),
]


@pytest.mark.parametrize("bits,N,K,group,symmetric", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,config", [(1, {"MODE": "plane"}), (1, {"MODE": "decode", "SPLIT_K": 2}),
                                      (1, {"MODE": "dot"}), (5, {"SPLIT_K": 1}), (17, {"SPLIT_K": 3})],
                         ids=["gemv-plane", "gemv-decode-split2", "gemv-dot", "gemm5", "gemm17-split3"])
def test_kernel_matches_twin(bits, N, K, group, symmetric, dtype, M, config):
    seed = hash((bits, N, K, group, symmetric, M, str(dtype))) % 2**31
    q, qw, sc, qz = packed(N, K, bits, group, symmetric, seed)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
    y = qmm_triton(x, qw, sc, qz, bits, group, K, config=config, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "some outputs were never written"
    ref = x.float().cpu() @ q.dequantize().t()
    err = ((y.float().cpu() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], err


def test_twin_is_the_fake_quantized_matmul():
    q, qw, sc, qz = packed(40, 200, 3, 64, False, 0)
    W = dequantize_packed(qw.cpu(), sc.cpu(), qz.cpu(), 3, 64, 200)
    assert torch.equal(W, q.dequantize())
    x = torch.randn(3, 200)
    assert torch.equal(qmm_reference(x, qw.cpu(), sc.cpu(), qz.cpu(), 3, 64, 200), x @ q.dequantize().t())


def test_kernel_batches_leading_dims():
    q, qw, sc, qz = packed(32, 64, 4, 32, False, 3)
    x = torch.randn(2, 3, 64).to(DEVICE, torch.float16)
    y = qmm_triton(x, qw, sc, qz, 4, 32, 64)
    assert y.shape == (2, 3, 32)
    ref = x.float().cpu() @ q.dequantize().t()
    assert ((y.float().cpu() - ref).norm() / ref.norm()) < TOL[torch.float16]


def test_kernel_refuses_float32_and_bad_mode():
    q, qw, sc, qz = packed(32, 64, 4, 32, False, 4)
    with pytest.raises(TypeError, match="fp16 or bf16"):
        qmm_triton(torch.randn(1, 64, device=DEVICE), qw, sc, qz, 4, 32, 64)
    with pytest.raises(ValueError, match="one activation row"):
        qmm_triton(torch.randn(2, 64, device=DEVICE).half(), qw, sc, qz, 4, 32, 64, config={"MODE": "plane"})


@pytest.mark.skipif(not HAS_CUDA, reason="autotuning needs a GPU")
def test_autotuned_launch_on_gpu():
    q, qw, sc, qz = packed(4096, 4096, 4, 128, False, 5)
    for M in (1, 16):
        x = torch.randn(M, 4096, device="cuda", dtype=torch.float16)
        y = qmm_triton(x, qw, sc, qz, 4, 128, 4096)
        y2 = qmm_triton(x, qw, sc, qz, 4, 128, 4096)         # second call: cached config, same answer
        ref = x.float().cpu() @ q.dequantize().t()
        assert ((y.float().cpu() - ref).norm() / ref.norm()) < 3e-3
        assert torch.allclose(y, y2, rtol=1e-3, atol=1e-3)
