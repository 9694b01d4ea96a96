"""Gradient probes one decoder block at a time: the same numbers as the whole-model pass, with one block's
gradients and statistics in memory instead of the whole model's.

    1. forward, no grad: the hidden state entering every block, per micro-batch (kept on the host)
    2. the rest of the model after the last block: loss, its gradient g with respect to the last hidden
       state, and the statistics of units there (an untied LM head)
    3. blocks last to first: recompute the block from its stored input with grad, backpropagate g through
       it (giving the next g), with the probe's Collector gathering the block's statistics (fisher: squared
       weight gradients; kfac: input XᵀX and squared output gradients), then reduce them to the block's
       rows of the cost table before moving on

Chain rule, same micro-batches, same order of additions per parameter: the table equals the whole-model
one up to floating-point reassociation (tests/scale/test_streaming.py holds it to 1e-4 relative). Fisher's
costs add up over windows, so it takes them in groups (``GROUP_BYTES`` of boundary activations each): its
memory is the model's, one block's statistics and one group's activations, whatever the number of windows.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Protocol

import torch
from tqdm.auto import tqdm

from ..errors import BitallocError
from ..options import QuantSpec
from ..units import Unit, unit_slice, unit_weight
from .base import (Workload, check_loss, check_trainable, grads_only_for, modules_by_name, tied_to_embeddings,
                   unique_params)


class Collector(Protocol):
    """What a gradient probe gathers during each block's recompute and backward pass."""

    def params(self, units: list[Unit]) -> list[torch.Tensor]:
        """Parameters whose gradients the collector reads ([] when it needs none)."""

    def collect(self, units: list[Unit]) -> contextlib.AbstractContextManager:
        """Active while ``units``' block (or the part after the blocks) runs forward and backward."""

    def reduce(self, cost: torch.Tensor, rows: list[int], units: list[Unit], steps: int) -> None:
        """Fill ``cost[rows]`` for ``units`` from what was gathered, then drop it."""

    def loss_scale(self, batch: torch.Tensor) -> float:
        """Factor on the mean loss (kfac differentiates the summed per-token loss)."""


GROUP_BYTES = 32 << 20      # boundary activations of one window group (collectors whose costs add up over windows)


def streamed_costs(workload: Workload, units: list[Unit], options: list[QuantSpec], collector: Collector, *,
                   micro_batch: int = 1, max_windows: int | None = None,
                   desc: str = "streamed") -> tuple[torch.Tensor, int]:
    """(cost (U, O) float64, number of micro-batches), one decoder block at a time. A collector whose costs
    add up over windows (``collector.additive``: fisher) takes the windows in groups whose boundary
    activations fit ``GROUP_BYTES``, so memory does not grow with the number of windows."""
    model = workload.model
    check_trainable(model, units)
    stream = workload.stream(units)
    where = [stream.block_of(u) for u in units]
    head_units = [u for u, b in zip(units, where) if b is None]
    if any(u.kind == "embedding" for u in head_units) or tied_to_embeddings(model, head_units):
        raise BitallocError("block streaming cannot measure embedding units or an LM head tied to the embeddings "
                            "(their gradient comes from every block): use --stream off")
    tokens = torch.cat(list(workload.batches()))
    if max_windows is not None:
        tokens = tokens[:max_windows]
    batches = [tokens[i:i + micro_batch] for i in range(0, len(tokens), micro_batch)]
    n_blocks = len(stream.blocks)
    per_batch = boundary_bytes(model, tokens[:micro_batch], n_blocks)
    per_group = max(1, GROUP_BYTES // max(per_batch, 1)) if getattr(collector, "additive", False) else len(batches)
    check_host_memory(model, tokens[:per_group * micro_batch], n_blocks)
    large_allocations_unmapped()
    cost = torch.zeros(len(units), len(options), dtype=torch.float64)
    bar = tqdm(total=len(batches) * (2 * n_blocks + 2), desc=desc, leave=False)
    with grads_only_for(model, []), stream.resident():
        for g in range(0, len(batches), per_group):
            _streamed_group(workload, stream, units, where, collector, batches[g:g + per_group], cost, len(batches),
                            bar)
    bar.close()
    return cost, len(batches)


def _streamed_group(workload, stream, units, where, collector, batches, cost, steps, bar) -> None:
    """Steps 1–3 of the module docstring on ``batches``; the collector adds their share to ``cost``."""
    n_blocks, device = len(stream.blocks), stream.device
    head_units = [u for u, b in zip(units, where) if b is None]
    # 1. boundary activations, block by block (kept on the host)
    with torch.no_grad():
        firsts = [stream.inputs(b) for b in batches]
        extras = [extra for _, extra in firsts]
        hidden = [[h.cpu() for h, _ in firsts]]
        bar.update(len(batches))
        for i in range(n_blocks):
            with stream.block_on_device(i):
                hidden.append([stream.run_block(i, h.to(device), e).cpu() for h, e in zip(hidden[-1], extras)])
            bar.update(len(batches))
    # 2. after the last block: g = ∂loss/∂h_L, and the head units' statistics
    grads_out = []
    params = collector.params(head_units)
    with grads_only_for(workload.model, params), collector.collect(head_units):
        for k, b in enumerate(batches):
            h = hidden[-1][k].to(device).requires_grad_(True)
            loss = workload.loss_after_blocks(stream, h, b)
            check_loss(loss, f"calibration micro-batch {k}")
            torch.autograd.backward(loss * collector.loss_scale(b), inputs=[h, *params])
            grads_out.append(h.grad.detach())
            bar.update()
    hidden.pop()
    collector.reduce(cost, [j for j, b in enumerate(where) if b is None], head_units, steps)
    # 3. blocks, last to first
    for i in reversed(range(n_blocks)):
        rows = [j for j, b in enumerate(where) if b == i]
        block_units = [units[j] for j in rows]
        inputs = hidden.pop()
        with stream.block_on_device(i):
            params = collector.params(block_units)
            with grads_only_for(workload.model, params), collector.collect(block_units):
                for k in range(len(batches)):
                    h = inputs[k].to(device).requires_grad_(True)
                    y = stream.run_block(i, h, extras[k])
                    torch.autograd.backward(y, grad_tensors=grads_out[k], inputs=[h, *params])
                    grads_out[k] = h.grad.detach()
                    bar.update()
            release_freed_memory()
            collector.reduce(cost, rows, block_units, steps)
        del inputs
        release_freed_memory()


class FisherCollector:
    """fisher: F = Σ (∂loss/∂W)² per micro-batch, squared into float32 as each gradient is ready. Costs are
    linear in F, so a group of windows adds its share (``additive``)."""

    additive = True

    def __init__(self, model, options: list[QuantSpec], costs_fn, rows_out: dict | None = None):
        self.modules = modules_by_name(model, [])
        self.model, self.options, self.costs_fn = model, options, costs_fn
        self.rows_out = rows_out          # unit index -> (out, O) row costs, when costs_fn gives rows
        self.F: list[torch.Tensor] = []
        self.index: list[int] = []

    def params(self, units):
        params, self.index = unique_params(self.model, units)
        self._params = params
        return params

    @contextlib.contextmanager
    def collect(self, units):
        self.F = [torch.zeros_like(p, dtype=torch.float32) for p in self._params]
        with _squares_into(self._params, self.F):
            yield

    def reduce(self, cost, rows, units, steps):
        for j, u, k in zip(rows, units, self.index):
            c = self.costs_fn(unit_slice(self.F[k], u), unit_weight(self.modules, u), self.options) / steps
            if c.dim() == 2:                     # per-row costs: keep them, the unit's cost is their sum
                if self.rows_out is not None:
                    self.rows_out[j] = self.rows_out[j] + c if j in self.rows_out else c
                c = c.sum(0)
            cost[j] += c
        self.F = []

    def loss_scale(self, batch):
        return 1.0


def streamed_fisher_costs(workload: Workload, units: list[Unit], options: list[QuantSpec], *,
                          micro_batch: int = 1, max_windows: int | None = None,
                          costs_fn=None, rows_out: dict | None = None) -> tuple[torch.Tensor, int]:
    """The fisher table one block at a time; ``costs_fn(F, W, options)`` gives one unit's costs, (O,) or per
    row (out, O) (then kept in ``rows_out[unit index]``)."""
    return streamed_costs(workload, units, options, FisherCollector(workload.model, options, costs_fn, rows_out),
                          micro_batch=micro_batch, max_windows=max_windows, desc="fisher (streamed)")


@contextlib.contextmanager
def _squares_into(params: list[torch.Tensor], F: list[torch.Tensor]):
    """While active, each parameter's gradient is squared into its F (float32) as soon as it is ready and
    then dropped, so at most one parameter's gradient exists at a time."""
    def hook(acc):
        def fn(p):
            g, a = p.grad.reshape(-1, p.shape[-1]), acc.view(-1, p.shape[-1])
            for r in range(0, g.shape[0], 1024):          # in row chunks: small float32 temporaries
                a[r:r + 1024].addcmul_(g[r:r + 1024].float(), g[r:r + 1024].float())
            p.grad = None
        return fn
    handles = [p.register_post_accumulate_grad_hook(hook(acc)) for p, acc in zip(params, F)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.grad = None


def release_freed_memory() -> None:
    """Hand memory freed by the last block back to the OS (glibc keeps it otherwise), so the peak RSS is
    one block's, not the sum of fragments."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def large_allocations_unmapped() -> None:
    """glibc: serve allocations above 1 MiB by mmap, always, so a freed gradient or temporary goes back to
    the OS at once (the default threshold grows with use and then keeps freed blocks in the heap)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def available_host_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def boundary_bytes(model, tokens: torch.Tensor, n_blocks: int) -> int:
    """Bytes of the boundary activations of ``tokens`` (one hidden state per block boundary, plus a gradient)."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    return (n_blocks + 2) * tokens.numel() * hidden * next(model.parameters()).element_size()


def check_host_memory(model, tokens: torch.Tensor, n_blocks: int) -> None:
    """The boundary activations (one hidden state per block boundary per window, plus one gradient) must fit
    in the host's available memory: else say how many windows would."""
    available = available_host_bytes()
    per_window = boundary_bytes(model, tokens[:1], n_blocks)
    if not per_window or available is None:
        return
    if per_window * len(tokens) > 0.8 * available:
        fit = int(0.8 * available // per_window)
        raise BitallocError(f"the boundary activations of {len(tokens)} windows ({per_window * len(tokens) / 2**30:.1f} "
                            f"GiB) do not fit in the host's {available / 2**30:.1f} GiB available: {fit} windows of "
                            f"{tokens.shape[1]} tokens fit; pass --n-windows {max(fit, 1)} or a smaller --seq-len")
