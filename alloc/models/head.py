"""The part of a causal LM after its decoder blocks (final norm, LM head, soft-capping), a few positions at a
time, so that no (tokens × vocabulary) float32 tensor of a whole window ever exists: with Gemma-3's 262k
vocabulary one window of 512 tokens has 537 MB of logits, a batch of 8 four GB.

    nll(h, batch)                per-window mean next-token NLL of the final hidden state h (b, T, d)
    kl(h_ref, h, batch)          per-window mean KL(p_ref ‖ p) over all T positions
    loss(h, batch)               the mean next-token cross-entropy, differentiable in h (each chunk's logits
                                 are recomputed in the backward pass instead of being kept)
    backward(h, batch, scale)    backpropagates scale × the summed cross-entropy through the head chunk by
                                 chunk, then through h's graph once: no chunk is computed twice (a third less
                                 work than loss().backward() on Gemma-3's head); returns the mean loss

Each chunk is the model's own forward after the blocks (``BlockStream.logits``, with every block replaced by a
stand-in), so whatever the family does there (Gemma's soft-capping, OPT's projection) is done. ``chunk``
positions of every window of the batch are taken at once: about ``CHUNK_LOGITS`` logits.

The reductions over the vocabulary (log-sum-exp, KL) read the logits in the model's dtype and do their
arithmetic in float32; over a large vocabulary they run as one fused kernel (``torch.compile``: 30× the
eager speed on a 2-core CPU, Gemma-3 KL of a window 0.09 s instead of 2.5 s), falling back to eager torch
where compiling is not possible (no C compiler) or ``BITALLOC_COMPILE=0``.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .stream import BlockStream

CHUNK_LOGITS = 1 << 24          # logits per chunk: 16M, 32 MB in bf16 (64 MB as float32)
LOSS_CHUNK_LOGITS = 1 << 26     # with gradients (loss): 64M (256 MB as float32); a chunk's logits, their float32 copy
                                # and gradient live at once. Smaller chunks read the whole head weight once per chunk
                                # and twice more in backward: Gemma's 262k x 640 head in 16-position chunks made the
                                # loss memory-bound (192 s per 4 windows)
FUSE_ABOVE = 1 << 16            # vocabularies at least this large use the compiled reductions


def lse_terms(logits: torch.Tensor) -> torch.Tensor:
    """log Σ exp over the last dimension, float32 arithmetic: (..., V) -> (...)."""
    return torch.logsumexp(logits.float(), dim=-1)


def kl_terms(ref: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp of ``logits``, KL(softmax ref ‖ softmax logits)) per position, float32 arithmetic.

    With a = ref, b = logits, p = softmax(a), d = a − b:  lse(b) = lse(a) + log1p(Σ p·expm1(−d)) and
    KL = Σ p·d + log1p(Σ p·expm1(−d)). Both sums are of the size of d, so a small KL keeps its digits (the
    textbook Σ p·d − lse(a) + lse(b) loses them to the log-sum-exps, ~10 in size); no log-probability tensor
    is formed. Where the two distributions are far apart (|lse(b) − lse(a)| ≥ 1/4: the log1p argument near −1,
    or exp(−d) beyond float32) the direct lse(b) − lse(a) is used: there its rounding is small against the KL
    (a 3-bit Gemma-3 put almost all mass on tokens the fp model ruled out and the log1p form gave NaN)."""
    a = ref.float()
    b = logits.float()
    d = a - b
    la = torch.logsumexp(a, dim=-1)
    direct = torch.logsumexp(b, dim=-1) - la
    p = torch.exp(a - la[..., None])
    x = (p * torch.expm1((-d).clamp(max=80.0))).sum(-1)
    near = torch.log1p(x.clamp(min=-0.75))
    tail = torch.where((direct.abs() < 0.25) & ((near - direct).abs() < 1e-3), near, direct)
    return la + tail, (p * d).sum(-1) + tail


_FUSED: dict = {}


def fused(fn):
    """``fn`` compiled into one kernel (dynamic shapes), or ``fn`` itself where that fails or is switched off."""
    if os.environ.get("BITALLOC_COMPILE", "1") == "0" or _FUSED.get(fn) is False:
        return fn
    if fn not in _FUSED:
        _FUSED[fn] = torch.compile(fn, dynamic=True)

    def run(*args):
        try:
            return _FUSED[fn](*args)
        except Exception:                 # no compiler, an unsupported platform: eager from now on
            _FUSED[fn] = False
            return fn(*args)
    return run


def positions_per_chunk(batch_size: int, vocab: int, logits: int | None = None) -> int:
    return max(1, (CHUNK_LOGITS if logits is None else logits) // max(batch_size * vocab, 1))


class Head:
    def __init__(self, stream: BlockStream, vocab: int):
        self.stream, self.vocab = stream, vocab

    def _chunks(self, T: int, b: int, logits: int | None = None):
        step = positions_per_chunk(b, self.vocab, logits)
        for s in range(0, T, step):
            yield s, min(s + step, T)

    def logits(self, h: torch.Tensor, batch: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """(b, e − s, vocab) logits at positions s..e−1, in the model's dtype."""
        return self.stream.logits(h[:, s:e], batch[:, s:e])

    def _reduce(self, fn):
        return fused(fn) if self.vocab >= FUSE_ABOVE else fn

    @staticmethod
    def _target_nll(lse: torch.Tensor, logits: torch.Tensor, batch: torch.Tensor, s: int, e: int, T: int):
        """Σ over positions s..min(e, T−1)−1 of lse − logit of the next token, per window (float64)."""
        t = min(e, T - 1)
        if t <= s:
            return torch.zeros(len(batch), dtype=torch.float64, device=logits.device)
        target = logits[:, :t - s].gather(-1, batch[:, s + 1:t + 1, None]).squeeze(-1).float()
        return (lse[:, :t - s] - target).double().sum(1)

    @torch.no_grad()
    def nll(self, h: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """(b,) mean next-token NLL of each window (positions 0..T−2 predict tokens 1..T−1)."""
        batch = batch.to(h.device)
        T = batch.shape[1]
        total = torch.zeros(len(batch), dtype=torch.float64, device=h.device)
        lse_fn = self._reduce(lse_terms)
        for s, e in self._chunks(T - 1, len(batch)):
            logits = self.logits(h, batch, s, e)
            total += self._target_nll(lse_fn(logits), logits, batch, s, e, T)
        return total / (T - 1)

    @torch.no_grad()
    def nll_kl(self, h_ref: torch.Tensor, h: torch.Tensor, batch: torch.Tensor, *, ref_head=None,
               head=None) -> tuple[torch.Tensor, torch.Tensor]:
        """((b,) mean NLL of ``h``, (b,) mean KL(p_ref ‖ p) over all T positions of each window). ``ref_head`` /
        ``head``: context managers under which the reference / the scored logits are computed (a quantized LM
        head: the reference needs the fp one); the default is the model as it is."""
        batch = batch.to(h.device)
        T = batch.shape[1]
        nll = torch.zeros(len(batch), dtype=torch.float64, device=h.device)
        kl = torch.zeros_like(nll)
        kl_fn = self._reduce(kl_terms)
        for s, e in self._chunks(T, len(batch)):
            with ref_head() if ref_head else contextlib.nullcontext():
                ref = self.logits(h_ref, batch, s, e)
            with head() if head else contextlib.nullcontext():
                logits = self.logits(h, batch, s, e)
            lse, kl_pos = kl_fn(ref, logits)
            kl += kl_pos.double().sum(1)
            nll += self._target_nll(lse, logits, batch, s, e, T)
        return nll / (T - 1), kl / T

    @torch.no_grad()
    def reference(self, h_ref: torch.Tensor, batch: torch.Tensor, *, stride: int = 1) -> list[torch.Tensor]:
        """The logits of ``h_ref`` at every ``stride``-th position, chunk by chunk as ``kl`` takes them (to keep
        when many outputs are compared with one reference: a search, a probe)."""
        batch = batch.to(h_ref.device)
        h_ref, batch = h_ref[:, ::stride], batch[:, ::stride]
        return [self.logits(h_ref, batch, s, e) for s, e in self._chunks(batch.shape[1], len(batch))]

    @torch.no_grad()
    def kl(self, h_ref: torch.Tensor | None, h: torch.Tensor, batch: torch.Tensor, *, stride: int = 1,
           ref: list[torch.Tensor] | None = None, ref_head=None, head=None, rows: int | None = None) -> torch.Tensor:
        """(b,) mean KL(p_ref ‖ p) over the positions 0, stride, 2·stride, … of each window (a search's fitness:
        the head's cost falls with the stride, the decoder's does not). ``ref``: the reference's logits from
        ``reference`` (then ``h_ref`` is not needed), taken for a batch of ``rows`` windows (default this one's:
        some of a larger batch's rows chunk its positions as that batch did)."""
        batch = batch.to(h.device)
        h, batch = h[:, ::stride], batch[:, ::stride]
        kl = torch.zeros(len(batch), dtype=torch.float64, device=h.device)
        kl_fn = self._reduce(kl_terms)
        for k, (s, e) in enumerate(self._chunks(batch.shape[1], rows or len(batch))):
            if ref is not None:
                a = ref[k]
            else:
                with ref_head() if ref_head else contextlib.nullcontext():
                    a = self.logits(h_ref[:, ::stride], batch, s, e)
            with head() if head else contextlib.nullcontext():
                logits = self.logits(h, batch, s, e)
            kl += kl_fn(a, logits)[1].double().sum(1)
        return kl / batch.shape[1]

    def loss(self, h: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch, differentiable in ``h`` and in the head's weights."""
        batch = batch.to(h.device)
        T = batch.shape[1]
        n = len(batch) * (T - 1)
        total = 0.0
        for s, e in self._chunks(T - 1, len(batch), min(LOSS_CHUNK_LOGITS, CHUNK_LOGITS)):
            total = total + checkpoint(self._chunk_loss, h[:, s:e], batch[:, s:e], batch[:, s + 1:e + 1],
                                       use_reentrant=False)
        return total / n

    def backward(self, h: torch.Tensor, batch: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``(loss(h, batch) × scale).backward()`` without computing any chunk twice: each chunk's graph is
        built, run backward into a detached copy of ``h`` and freed; ``h``'s own graph then runs once with the
        summed gradient. Hooks on the head see each chunk's gradient as they would. Returns the mean loss."""
        batch = batch.to(h.device)
        T = batch.shape[1]
        n = len(batch) * (T - 1)
        top = h.detach().requires_grad_(True)
        total = torch.zeros((), dtype=torch.float64)
        for s, e in self._chunks(T - 1, len(batch), min(LOSS_CHUNK_LOGITS, CHUNK_LOGITS)):
            chunk = self._chunk_loss(top[:, s:e], batch[:, s:e], batch[:, s + 1:e + 1])
            (chunk * (scale / n)).backward()
            total += float(chunk.detach())
        if h.requires_grad and top.grad is not None:
            h.backward(top.grad)
        return total / n

    def _chunk_loss(self, h: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.stream.logits(h, inputs).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def vocab_size(model) -> int:
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = out.weight.shape[0] if out is not None else 0
    return int(vocab)
