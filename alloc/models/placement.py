"""Where a prepared model runs: on the CPU, on a GPU, or with its weights on the host and one decoder block at a
time on the GPU (the way 70B models are quantized on one GPU)."""
from __future__ import annotations

import torch

from ..errors import BitallocError, SettingError
from .distributed import local_device

GPU_SHARE = 0.8          # a model over this share of the GPU's free memory stays on the host (stream "auto")


def place(prepared, device: str | None = None, *, stream: str = "auto") -> None:
    """Put the model on ``device`` (None: cuda when available). On a GPU, a stage that can run one decoder block
    at a time keeps the weights on the host and streams blocks to the GPU (``prepared.compute_device``) with
    ``stream`` "on", or ("auto") when the model takes more than 80 % of the GPU's free memory."""
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise SettingError("device", f"{{name}} {device!r} is not understood: use cpu or cuda")
    device = local_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BitallocError("device cuda asked for, but torch sees no CUDA device: use cpu")
    if device.startswith("cuda") and stream != "off" and _too_large(prepared.model, device, stream):
        prepared.compute_device = device
    else:
        prepared.model.to(device)


def _too_large(model, device: str, stream: str) -> bool:
    if stream == "on":
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return sum(p.numel() * p.element_size() for p in model.parameters()) > GPU_SHARE * free
