"""Workloads: a model plus calibration windows, in the form probes and solvers use (sensitivity/base.py).

CausalLMWorkload: next-token cross-entropy as the loss, KL(fp ‖ quantized) as the divergence.
EncoderWorkload: mean-pooled sentence embeddings; divergence = 1 − cosine to the fp embedding. It has no
training loss, so gradient probes refuse it (use output_error or measured_kl).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitallocError

if TYPE_CHECKING:
    from .stream import BlockStream


LARGE_LOGITS = 1 << 28        # bytes of float32 logits of one micro-batch beyond which the loss is chunked


class CausalLMWorkload:
    can_stream = True           # block streaming (alloc/models/stream.py) needs the LM head after the blocks
    def __init__(self, model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8,
                 compute_device: str | torch.device | None = None, units=None):
        self.model = model
        self.tokens = tokens                      # (n_windows, seq_len) int64
        self.batch_size = batch_size
        self.compute_device = compute_device      # set when the weights stay on the host (block streaming)
        self.units = units                        # the units (they say which blocks are the decoder's)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def batches(self) -> Iterator[torch.Tensor]:
        """Calibration batches on the model's device (probes run on CUDA when the model is there)."""
        for i in range(0, len(self.tokens), self.batch_size):
            yield self.tokens[i:i + self.batch_size].to(self.device)

    def n_batches(self) -> int:
        return -(-len(self.tokens) // self.batch_size)

    def subset(self, n_windows: int) -> "CausalLMWorkload":
        return type(self)(self.model, self.tokens[:n_windows], batch_size=self.batch_size,
                          compute_device=self.compute_device, units=self.units)

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch).logits.float()             # (b, seq, vocab)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; with a large vocabulary (Gemma's 262k) the decoder blocks run as
        usual and the LM head a few positions at a time (alloc/models/head.py), never a batch's full logits."""
        if not self.large_logits(batch):
            return self.loss_from_logits(self.logits(batch), batch)
        stream = self.stream(self.units)
        h, extra = stream.inputs(batch)
        for i in range(len(stream.blocks)):
            h = stream.run_block(i, h, extra)
        return self.head(stream).loss(h, batch)

    def backward(self, batch: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(loss(batch) × scale).backward()``, the LM head of a large vocabulary chunk by chunk with no chunk
        computed twice (Head.backward); returns the loss (detached)."""
        if not self.large_logits(batch):
            loss = self.loss(batch)
            (loss * scale).backward()
            return loss.detach()
        stream = self.stream(self.units)
        h, extra = stream.inputs(batch)
        for i in range(len(stream.blocks)):
            h = stream.run_block(i, h, extra)
        return self.head(stream).backward(h, batch, scale)

    def run(self, batch: torch.Tensor) -> None:
        """A forward pass for the units' hooks: the decoder blocks only, when every unit lies inside them or is
        the token embedding (the LM head's logits are not needed: 4 GB for a batch of 8 windows of Gemma-3),
        else the whole model."""
        from ..units import find_blocks
        if self.units is None or not find_blocks(self.model, self.units):
            self.model(input_ids=batch)
            return
        stream = self.stream(self.units)
        if any(stream.block_of(u) is None and u.kind != "embedding" for u in self.units):
            self.model(input_ids=batch)
            return
        h, extra = stream.inputs(batch)
        for i in range(len(stream.blocks)):
            h = stream.run_block(i, h, extra)

    def large_logits(self, batch: torch.Tensor) -> bool:
        from ..units import find_blocks
        from .head import vocab_size
        return batch.numel() * vocab_size(self.model) * 4 > LARGE_LOGITS and self.units is not None \
            and bool(find_blocks(self.model, self.units))

    def head(self, stream: "BlockStream"):
        from .head import Head, vocab_size
        return Head(stream, vocab_size(self.model))

    def loss_after_blocks(self, stream: "BlockStream", h: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """The loss when ``h`` leaves the last block (block-streamed probes), chunked like ``loss``."""
        if self.large_logits(batch):
            return self.head(stream).loss(h, batch)
        return self.loss_from_logits(stream.logits(h, batch), batch)

    @staticmethod
    def loss_from_logits(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (float32) of (b, seq, vocab) logits on ``batch``."""
        logits = logits.float()[:, :-1]
        batch = batch.to(logits.device)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def stream(self, units) -> "BlockStream":
        """The model as a sequence of decoder blocks (alloc/models/stream.py), for block-streamed probes."""
        from .stream import BlockStream
        return BlockStream(self.model, units, self.compute_device)

    @staticmethod
    def loss_terms(batch: torch.Tensor) -> int:
        """How many per-token terms ``loss`` averages (predicted positions)."""
        return batch.numel() - len(batch)

    @staticmethod
    def divergence(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of KL(p_ref ‖ p_out) of two sets of logits (alloc/models/head.py's kl_terms: a small KL
        keeps its digits)."""
        from .head import kl_terms
        return kl_terms(reference, output)[1].mean()


class EncoderWorkload(CausalLMWorkload):
    can_stream = False
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=batch).last_hidden_state      # (b, seq, dim); windows have no padding
        return hidden.mean(dim=1).float()                            # mean pooling -> (b, dim)

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        raise BitallocError("an encoder has no training loss for gradient probes: use --probe output_error or measured_kl")

    def stream(self, units) -> "BlockStream":
        raise BitallocError("block streaming runs causal LMs only (it needs their LM head): use --stream off")

    def run(self, batch: torch.Tensor) -> None:
        self.model(input_ids=batch)

    @staticmethod
    def divergence(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(reference.float(), output.float(), dim=-1).mean()


def make_workload(model: nn.Module, kind: str, tokens: torch.Tensor, *, batch_size: int = 8,
                  compute_device: str | torch.device | None = None, units=None):
    cls = CausalLMWorkload if kind == "causal_lm" else EncoderWorkload
    return cls(model, tokens, batch_size=batch_size, compute_device=compute_device, units=units)
