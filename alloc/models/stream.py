"""Block streaming: run a Hugging Face decoder one block at a time (what GPTQModel and llm-compressor call
sequential onloading), so a probe holds one block's gradients and statistics at a time, never the whole
model's.

    inputs(batch)            hidden state entering block 0 plus the arguments each block gets (rotary
                             embeddings, masks: per block, since families with sliding-window and global
                             layers, such as Gemma-3, Qwen3 or GPT-OSS, give their layer types different
                             ones), recorded by stand-ins that pass the hidden state on without computing
    run_block(i, h, extra)   block i on hidden state h -> its output hidden state
    logits(h, batch)         the rest of the model after the last block (final norm, LM head) applied to h:
                             the model's own forward with every block replaced by a stand-in that passes its
                             input through, the last one handing over h

Boundary activations (the hidden state between blocks, per calibration window) are the caller's to keep;
they live on the host in the model's dtype.

Weights may stay on the host (or memory-mapped from the checkpoint) while the computation runs on a GPU:
``resident()`` puts everything outside the blocks (embeddings, final norm, LM head, rotary tables) on the
compute device for the whole pass and ``block_on_device(i)`` one block at a time. Both swap each tensor's
``.data`` and put the host tensor back afterwards, so nothing is copied back and a memory-mapped weight stays
mapped; GPTQ, which writes its quantized weights on the device, asks to ``keep`` them (the host tensor is then
replaced by a copy of the device's).
"""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from ..errors import BitallocError
from ..units import Unit, find_blocks


class _Stop(Exception):
    pass


class _StandIn(nn.Module):
    """Takes a block's place in ``logits``: passes its input through, or returns ``value`` (the last block).
    Attribute look-ups the decoder loop makes on its blocks (e.g. ``attention_type``) go to the real block."""

    def __init__(self, block: nn.Module, value: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.value, self.as_tuple = value, as_tuple

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


class _Recorder(_StandIn):
    """Takes a block's place in ``inputs``: records the arguments it is called with and passes the hidden
    state on (the last one stops the forward)."""

    def __init__(self, block: nn.Module, calls: list, last: bool):
        super().__init__(block, None, False)
        object.__setattr__(self, "_calls", calls)
        self.last = last

    def forward(self, *args, **kwargs):
        self._calls.append((args, kwargs))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def on_device(tensors, device: torch.device, *, keep: bool = False, copy: bool = False):
    """``tensors`` (parameters/buffers) on ``device`` for the duration; their host data is restored after,
    or, with ``keep``, replaced by what the device copy holds then (GPTQ writes its weights there). ``copy``
    stages a copy even where the tensor already is on ``device`` (tests check that nothing is lost)."""
    saved = [(t, t.data) for t in tensors if copy or t.device != device]
    try:
        for t, data in saved:
            t.data = data.to(device, non_blocking=True, copy=copy)
        yield
    finally:
        for t, data in saved:
            t.data = t.data.to(data.device, copy=copy) if keep else data


class BlockStream:
    def __init__(self, model: nn.Module, units: list[Unit], device: str | torch.device | None = None, *,
                 copy: bool = False):
        self.model = model
        self._device = torch.device(device) if device is not None else None
        self.copy = copy               # stage copies even on the host (tests: what the device computes is kept)
        self.blocks = find_blocks(model, units)
        if not self.blocks:
            raise BitallocError("streaming needs a model made of repeated decoder blocks: use --stream off")
        self.container = model.get_submodule(self.blocks[0][0].rpartition(".")[0])      # the ModuleList
        self.as_tuple = False

    @property
    def device(self) -> torch.device:
        """Where the computation runs (the model's own device unless given)."""
        return self._device or next(self.model.parameters()).device

    def resident(self, keep: bool = False):
        """Everything outside the decoder blocks on the compute device, for the whole streamed pass (``keep``:
        what it holds at the end goes back to the host, as ``on_device`` says)."""
        in_blocks = {id(t) for _, b in self.blocks for t in itertools.chain(b.parameters(), b.buffers())}
        rest = [t for t in itertools.chain(self.model.parameters(), self.model.buffers()) if id(t) not in in_blocks]
        return on_device(rest, self.device, keep=keep, copy=self.copy)

    def block_on_device(self, i: int, keep: bool = False):
        """Block ``i``'s weights on the compute device while it runs (``keep``: its weights as they are at
        the end go back to the host)."""
        block = self.blocks[i][1]
        return on_device(list(itertools.chain(block.parameters(), block.buffers())), self.device, keep=keep,
                         copy=self.copy)

    def block_of(self, unit: Unit) -> int | None:
        for i, (name, _) in enumerate(self.blocks):
            if unit.module_name.startswith(name + "."):
                return i
        return None

    def inputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """(hidden state entering block 0, per block the (args, kwargs) the model hands it) of a batch of token
        ids: the model's forward with every block replaced by a recorder; the last one stops it."""
        calls: list[tuple[tuple, dict]] = []
        originals = [self.container[i] for i in range(len(self.container))]
        try:
            for i, block in enumerate(originals):
                self.container[i] = _Recorder(block, calls, last=i == len(originals) - 1)
            self.model(input_ids=batch.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            for i, block in enumerate(originals):
                self.container[i] = block
        extras = []
        for args, kwargs in calls:
            kwargs = dict(kwargs)
            if args:
                hidden, args = args[0], args[1:]
            else:
                hidden = kwargs.pop("hidden_states")
            extras.append((args, kwargs))
            if len(extras) == 1:
                first = hidden
        return first, tuple(extras)

    def run_block(self, i: int, hidden: torch.Tensor, extra: tuple) -> torch.Tensor:
        args, kwargs = extra[i]
        y = self.blocks[i][1](hidden, *args, **kwargs)
        self.as_tuple = isinstance(y, (tuple, list))
        return y[0] if self.as_tuple else y

    def logits(self, hidden: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """The model's logits when ``hidden`` leaves the last block (differentiable in ``hidden``)."""
        return self.rest(hidden, batch).logits

    def rest(self, hidden: torch.Tensor, batch: torch.Tensor):
        """The model's output (any model: an encoder's too) when ``hidden`` leaves the last block."""
        with self._stand_ins(hidden):
            return self.model(input_ids=batch.to(self.device), use_cache=False)

    @contextlib.contextmanager
    def _stand_ins(self, hidden: torch.Tensor):
        originals = [self.container[i] for i in range(len(self.container))]
        try:
            for i, block in enumerate(originals):
                self.container[i] = _StandIn(block, hidden if i == len(originals) - 1 else None, self.as_tuple)
            yield
        finally:
            for i, block in enumerate(originals):
                self.container[i] = block
