"""The Probe interface and the Workload it runs against.

A probe never sees Hugging Face: it gets a Workload (alloc/models/workload.py builds one for causal LMs and
encoders) that can run calibration batches and give a loss, and returns a SensitivityTable whose cost[u, o]
approximates the loss increase when unit u alone is stored as option o.
"""
from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterator, Protocol

import torch
from torch import nn

from ..errors import BitallocError
from ..registry import PROBES, instantiate
from ..options import QuantSpec
from ..quantize import Quantizer, as_quantizer
from ..units import EXPERT_KINDS, Unit, unit_param
from .table import SensitivityTable


class Workload(Protocol):
    """What a probe needs from a model: its modules, calibration batches, outputs and a loss."""

    model: nn.Module

    def batches(self) -> Iterator[torch.Tensor]:
        """Calibration batches, each (batch, seq) token ids; the same sequence on every call."""

    def n_batches(self) -> int: ...

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """(batch, seq, vocab) next-token logits (or (batch, dim) embeddings for encoders)."""

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Scalar training-style loss on ``batch`` (next-token cross-entropy for causal LMs)."""

    def loss_terms(self, batch: torch.Tensor) -> int:
        """Optional: how many terms ``loss`` averages (1 if it is a sum); K-FAC uses it to undo the mean."""

    def divergence(self, reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Mean divergence of ``output`` from the full-precision ``reference`` (KL for LMs)."""

    # Optional, for block-streamed probes (streamed.py, output_error.py):
    #   stream(units)                  the model as decoder blocks (alloc/models/stream.py: inputs, run_block, logits)
    #   loss_from_logits(logits, b)    the loss of given logits
    #   compute_device                 set when the weights stay on the host and blocks visit this device


class Probe(ABC):
    """Base class; subclasses are frozen dataclasses whose fields are the probe's settings."""

    name: ClassVar[str]
    needs_grad: ClassVar[bool] = False
    # Probes whose table is a mean over calibration samples name the meta field counting them: under
    # torchrun each rank measures its share and the tables are summed with these weights (alloc/models/distributed.py).
    samples_meta: ClassVar[str | None] = None
    gives_rows: ClassVar[bool] = False      # the table carries per-row costs (for --granularity row)
    # settings that do not change the numbers (block streaming computes the same costs), left out of the cache key
    same_numbers: ClassVar[tuple[str, ...]] = ("stream",)

    def __post_init__(self) -> None:
        if hasattr(self, "stream"):
            check_stream_mode(self.stream)
        if hasattr(self, "quantizer"):
            as_quantizer(self.quantizer)

    @property
    def rounding(self) -> Quantizer:
        """The quantizer whose damage the costs measure (the probe's ``quantizer`` setting: rtn or gptq)."""
        return as_quantizer(getattr(self, "quantizer", "rtn"))

    def settings(self) -> dict[str, Any]:
        """What the table depends on (its cache key): every field but those in ``same_numbers``."""
        settings = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        for name in self.same_numbers:
            settings.pop(name, None)
        return settings

    @abstractmethod
    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        """cost[u, o] for every unit × option."""

    def table(self, units: list[Unit], options: list[QuantSpec], cost: torch.Tensor, row_cost=None,
              **meta: Any) -> SensitivityTable:
        return SensitivityTable(units, options, cost, {"probe": self.name, "settings": self.settings(), **meta},
                                row_cost)


def modules_by_name(model: nn.Module, units: list[Unit]) -> dict[str, nn.Module]:
    """Every module of ``model`` by name (what ``unit_weight``/``unit_param`` look units up in)."""
    return dict(model.named_modules())


def unique_params(model: nn.Module, units: list[Unit]) -> tuple[list[torch.Tensor], list[int]]:
    """The distinct parameters holding ``units`` (experts of one stack share theirs) and, per unit, the
    index of its parameter in that list."""
    modules = modules_by_name(model, units)
    params: list[torch.Tensor] = []
    where: dict[int, int] = {}
    index = []
    for u in units:
        p = unit_param(modules, u)
        if id(p) not in where:
            where[id(p)] = len(params)
            params.append(p)
        index.append(where[id(p)])
    return params, index


def refuse_experts(units: list[Unit], probe: str) -> None:
    """Probes that read a layer's input through forward hooks cannot see what each expert receives."""
    experts = [u.name for u in units if u.kind in EXPERT_KINDS]
    if experts:
        raise BitallocError(f"the {probe} probe cannot measure MoE expert units ({experts[0]}, … {len(experts)} in "
                            "all): use --probe fisher, hessian_trace or measured_kl")


@contextlib.contextmanager
def grads_only_for(model: nn.Module, params: list[torch.Tensor]) -> Iterator[None]:
    """Within the block only ``params`` require grad; every flag is restored afterwards."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def check_loss(loss: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss):
        raise BitallocError(f"the loss is {loss.item()} on {where}: check the calibration text and the model's dtype")


def check_trainable(model: nn.Module, units: list[Unit]) -> None:
    """Gradient probes need float weights they can differentiate through."""
    modules = modules_by_name(model, units)
    for u in units:
        p = unit_param(modules, u)
        if not torch.is_floating_point(p):
            raise BitallocError(f"layer {u.name!r} has {p.dtype} weights: gradient probes need float "
                                "weights; use --probe output_error")


def tied_to_embeddings(model: nn.Module, units: list[Unit]) -> list[Unit]:
    """Units whose weight is the input embedding's (an LM head tied to it): their gradient comes from every
    block, so block streaming cannot measure them."""
    get_in = getattr(model, "get_input_embeddings", None)
    embedding = get_in() if callable(get_in) else None
    if embedding is None:
        return []
    modules = modules_by_name(model, units)
    return [u for u in units if unit_param(modules, u) is embedding.weight]


STREAM_MODES = ("auto", "on", "off")
STREAM_ABOVE_BYTES = 1 << 30      # auto: stream when the whole-model path's state would pass 1 GiB,
STREAM_ABOVE_MODEL_BYTES = 1 << 28    # or pass 256 MiB and the model's own size (it would more than double memory)


def check_stream_mode(mode: str) -> None:
    if mode not in STREAM_MODES:
        raise BitallocError(f"unknown --stream {mode!r}: choose auto, on or off")


def streams(workload: Workload, units: list[Unit], mode: str) -> bool:
    """Whether a probe runs one decoder block at a time (alloc/models/stream.py): ``on``/``off`` as asked; ``auto``
    when the weights stay on the host (a compute device is set) or when the whole-model path's per-unit
    state (fp32 Fisher + gradients, or XᵀX) would pass 1 GiB, or 256 MiB and the model's own bytes (Gemma-3-270M:
    600 MB against 536 MB), and the model has decoder blocks."""
    from ..units import find_blocks
    host_weights = getattr(workload, "compute_device", None) is not None
    if mode == "off" and host_weights:
        raise BitallocError("the weights stay on the host for block streaming: --stream off needs the whole "
                            "model on the device; leave --stream out")
    if mode != "auto" or host_weights:
        return mode == "on" or host_weights
    if not getattr(workload, "can_stream", hasattr(workload, "stream")) or any(u.kind == "embedding" for u in units):
        return False
    if tied_to_embeddings(workload.model, units):
        return False                               # an LM head tied to the embeddings: the whole-model path
    params, _ = unique_params(workload.model, units)
    whole = sum(p.numel() * (4 + p.element_size()) for p in params)
    model_bytes = sum(p.numel() * p.element_size() for p in workload.model.parameters())
    large = whole > STREAM_ABOVE_BYTES or (whole > model_bytes and whole > STREAM_ABOVE_MODEL_BYTES)
    return large and bool(find_blocks(workload.model, units))




def get_probe(name: str, **settings: Any) -> Probe:
    """Instantiate a probe by name (lazy import, so ``import bitalloc`` stays light)."""
    return instantiate(PROBES, "probe", name, settings)


def takes_quantizer(name: str) -> bool:
    """Whether the probe ``name`` can measure the damage of another quantizer than RTN (a ``quantizer`` setting)."""
    return "quantizer" in get_probe(name).settings()
