"""What the Triton kernel tests share: where they run (CUDA when present, else the CPU under
TRITON_INTERPRET=1, which .ci/run sets) and the tolerance against the fp32 torch twin."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (HAS_CUDA or INTERPRET),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 (the CI sets it)")
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}     # relative Frobenius error vs the fp32 twin
