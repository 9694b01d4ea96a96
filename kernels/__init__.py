"""Packed storage and the mixed-bitwidth kernels. Nothing here touches a GPU or imports Triton at import time."""
