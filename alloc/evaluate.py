"""Evaluation: perplexity on a text, KL to the full-precision model, embedding cosine for encoders.

Perplexity protocol (BENCHMARK.md): non-overlapping windows of ``seq_len`` tokens, the mean next-token
cross-entropy of each window, averaged over windows, exponentiated. The Evaluator computes the fp model's
outputs once and then scores any number of quantized weight sets against them in one pass each.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import BitallocError
from .quantize import Quantizer, as_quantizer, fake_quantize_rows
from .quantize_model import set_unit_weights, unit_weights
from .units import Unit, set_unit_weight, unit_weight


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(log-probabilities, summed per-window mean next-token NLL) of one batch of windows."""
    logp = F.log_softmax(logits.float(), dim=-1)
    nll = float(-logp[:, :-1].gather(-1, batch[:, 1:, None]).squeeze(-1).mean(-1).sum())
    return logp, nll


def final_states(stream, batch: torch.Tensor) -> torch.Tensor:
    """The hidden state leaving the last decoder block of ``stream``'s model on ``batch`` (b, T, d)."""
    h, extra = stream.inputs(batch)
    for i in range(len(stream.blocks)):
        h = stream.run_block(i, h, extra)
    return h


def head_of(model: nn.Module, units: list[Unit] | None):
    """(BlockStream, Head) of a causal LM made of decoder blocks (alloc/models/head.py), else (None, None)."""
    from .models.head import Head, vocab_size
    from .models.stream import BlockStream
    from .units import find_blocks
    if not find_blocks(model, units):
        return None, None
    stream = BlockStream(model, units)
    return stream, Head(stream, vocab_size(model))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 8, progress: bool = True,
               desc: str = "perplexity") -> float:
    """Perplexity of a causal LM on (n, seq) token windows, by the protocol above (any model: packed too);
    the LM head runs a few positions at a time (alloc/models/head.py) when the model has decoder blocks."""
    device = next(model.parameters()).device
    stream, head = head_of(model, None)
    nll = 0.0
    for i in tqdm(range(0, len(tokens), batch_size), desc=desc, leave=False, disable=not progress):
        batch = tokens[i:i + batch_size].to(device)
        if head is not None:
            nll += float(head.nll(final_states(stream, batch), batch).sum())
        else:
            nll += window_nll(model(input_ids=batch, use_cache=False).logits, batch)[1]
    return math.exp(nll / len(tokens))


@dataclass
class Scores:
    ppl: float | None          # causal LMs
    kl: float | None           # mean KL(fp ‖ quantized) per token, causal LMs
    cosine: float | None       # mean embedding cosine to fp, encoders

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Evaluator:
    """The fp model's outputs computed once; ``score`` rates any weight set against them in one pass. A causal
    LM made of decoder blocks keeps only the fp *final hidden states* (windows × tokens × hidden) and runs the
    LM head a few positions at a time for both sides (alloc/models/head.py): reference log-probabilities of
    32 windows of Gemma-3's 262k vocabulary would take 17 GB. Other models keep their reference outputs."""

    def __init__(self, model: nn.Module, kind: str, units: list[Unit], tokens: torch.Tensor, *,
                 batch_size: int = 8, progress: bool = True):
        self.model, self.kind, self.units, self.tokens = model, kind, units, tokens
        self.batch_size, self.progress = batch_size, progress
        self.fp_weights = unit_weights(model, units)
        self.stream, self.head = head_of(model, units) if kind == "causal_lm" else (None, None)
        modules = dict(model.named_modules())
        outside = [u for u in units if self.stream is not None and self.stream.block_of(u) is None]
        # units after or before the blocks (an LM head, embeddings): the reference needs their fp weights
        self._ref_head = (lambda: _Holding(modules, outside, self.fp_weights)) if outside else None
        self._reference: list[torch.Tensor] = []
        self.fp = self._score(None)

    def _batches(self):
        return [self.tokens[i:i + self.batch_size] for i in range(0, len(self.tokens), self.batch_size)]

    @torch.no_grad()
    def _score(self, weights: dict[str, torch.Tensor] | None, desc: str = "eval fp") -> Scores:
        first = weights is None
        set_unit_weights(self.model, self.units, self.fp_weights if first else weights)
        nll, kl, cos, n = 0.0, 0.0, 0.0, 0
        try:
            device = next(self.model.parameters()).device
            for k, batch in enumerate(tqdm(self._batches(), desc=desc, leave=False, disable=not self.progress)):
                batch = batch.to(device)
                if self.head is not None:
                    h = final_states(self.stream, batch)
                    if first:
                        self._reference.append(h)
                        nll += float(self.head.nll(h, batch).sum())
                    else:
                        b_nll, b_kl = self.head.nll_kl(self._reference[k], h, batch, ref_head=self._ref_head)
                        nll, kl = nll + float(b_nll.sum()), kl + float(b_kl.sum())
                elif self.kind == "causal_lm":
                    logp, batch_nll = window_nll(self.model(input_ids=batch, use_cache=False).logits, batch)
                    nll += batch_nll
                    if first:
                        self._reference.append(logp)
                    else:
                        ref = self._reference[k]
                        kl += float((ref.exp() * (ref - logp)).sum(-1).mean(-1).sum())
                else:
                    emb = self.model(input_ids=batch).last_hidden_state.mean(1).float()
                    if first:
                        self._reference.append(emb)
                    else:
                        cos += float(F.cosine_similarity(emb, self._reference[k], dim=-1).sum())
                n += len(batch)
        finally:
            set_unit_weights(self.model, self.units, self.fp_weights)
        if self.kind == "causal_lm":
            return Scores(ppl=math.exp(nll / n), kl=0.0 if first else kl / n, cosine=None)
        return Scores(ppl=None, kl=None, cosine=1.0 if first else cos / n)

    def score(self, weights: dict[str, torch.Tensor], desc: str = "eval") -> Scores:
        """Scores of the model with ``weights`` (unit name -> (out, in)) in place of the fp ones."""
        return self._score(weights, desc)

    def score_plan(self, plan, quantizer, calibration: torch.Tensor | None, desc: str = "eval",
                   progress: bool = False) -> Scores:
        """Scores of ``plan`` applied with ``quantizer`` (GPTQ on ``calibration``), as quantize_model writes it;
        the model holds its fp weights again afterwards."""
        from .quantize_model import quantize_model
        try:          # from the fp weights kept at the start, whatever the model holds now (a fitness may have loaded a plan)
            set_unit_weights(self.model, self.units, self.fp_weights)
            quantize_model(self.model, self.units, plan, quantizer=quantizer, calibration=calibration,
                           progress=progress, sink=lambda name, q: None)
            weights = unit_weights(self.model, self.units)
        finally:
            set_unit_weights(self.model, self.units, self.fp_weights)
        return self.score(weights, desc)


class _Holding:
    """While active, ``units`` hold ``weights``; the weights they held on entry come back on exit."""

    def __init__(self, modules: dict, units: list[Unit], weights: dict[str, torch.Tensor]):
        self.modules, self.units, self.weights = modules, units, weights

    def __enter__(self):
        self.saved = {u.name: unit_weight(self.modules, u).detach().clone() for u in self.units}
        for u in self.units:
            set_unit_weight(self.modules, u, self.weights[u.name])

    def __exit__(self, *exc):
        for u in self.units:
            set_unit_weight(self.modules, u, self.saved[u.name])


@contextlib.contextmanager
def _fake_quantized(modules: dict, units: list[Unit], plan, cache: dict | None = None, grid=None) -> None:
    """``units`` RTN fake-quantized by ``plan`` (as quantize_model does, ``grid`` its clipping search; None:
    --quantizer rtn's) for the duration, then restored; ``cache`` keeps the quantized weights between uses (the
    LM head, entered once per window)."""
    saved = {u.name: unit_weight(modules, u).detach().clone() for u in units}
    cache = {} if cache is None else cache
    try:
        for u in units:
            if u.name not in cache:
                cache[u.name] = fake_quantize_rows(saved[u.name].float(), plan.layers[u.name],
                                                   plan.row_bits.get(u.name), grid).to(saved[u.name].dtype)
            set_unit_weight(modules, u, cache[u.name])
        yield
    finally:
        for u in units:
            set_unit_weight(modules, u, saved[u.name])


class _Restored:
    """While active, changes to ``units``' weights are allowed; their weights on entry come back on exit."""

    def __init__(self, modules: dict, units: list[Unit]):
        self.modules, self.units = modules, units

    def __enter__(self):
        self.saved = {u.name: unit_weight(self.modules, u).detach().clone() for u in self.units}

    def __exit__(self, *exc):
        for u in self.units:
            set_unit_weight(self.modules, u, self.saved[u.name])


class _GPTQChain:
    """GPTQ one decoder block at a time, as quantize_model does it: the calibration windows' hidden states
    go through the already-quantized blocks, each block's XᵀX is collected on them."""

    def __init__(self, stream, model, plan, calibration: torch.Tensor, batch_size: int, quantizer: Quantizer):
        self.stream, self.model, self.plan, self.quantizer = stream, model, plan, quantizer
        self.batches = [calibration[i:i + batch_size] for i in range(0, len(calibration), batch_size)]
        firsts = [stream.inputs(b) for b in self.batches]
        self.extras = [extra for _, extra in firsts]
        self.hidden = [h.cpu() for h, _ in firsts]

    def quantize(self, i: int, units: list[Unit]) -> None:
        """GPTQ block ``i``'s ``units`` in place (the block is on the device), then carry the calibration
        states through the quantized block."""
        from .quantize_model import gptq_units
        device = self.stream.device

        def run():
            for h, e in zip(self.hidden, self.extras):
                self.stream.run_block(i, h.to(device), e)
        gptq_units(self.model, units, self.plan, run, {}, self.quantizer)
        self.hidden = [self.stream.run_block(i, h.to(device), e).cpu() for h, e in zip(self.hidden, self.extras)]

    def quantize_head(self, modules: dict, units: list[Unit]) -> dict[str, torch.Tensor]:
        """GPTQ of the units after the blocks on the last calibration states -> their weights (then restored)."""
        from .quantize_model import gptq_units
        device = self.stream.device
        with _Restored(modules, units):
            def run():
                for h, b in zip(self.hidden, self.batches):
                    self.stream.rest(h.to(device), b)
            gptq_units(self.model, units, self.plan, run, {}, self.quantizer)
            return {u.name: unit_weight(modules, u).detach().clone() for u in units}


@torch.no_grad()
def streamed_scores(model: nn.Module, units: list[Unit], tokens: torch.Tensor, plan, *, batch_size: int = 8,
                    progress: bool = True, compute_device=None, quantizer: "str | Quantizer" = "rtn",
                    calibration: torch.Tensor | None = None) -> tuple[Scores, Scores]:
    """(fp, plan) scores of a causal LM with the plan's weights, one decoder block at a time
    (alloc/models/stream.py): every window's hidden state is carried through each block twice, with the block's fp
    weights and with its quantized ones (RTN, or GPTQ on ``calibration`` windows carried along as
    quantize_model does); only one block's weights are ever copied and no reference logits are stored (they
    take windows × tokens × vocab floats). Same numbers as the Evaluator."""
    from .models.stream import BlockStream
    stream = BlockStream(model, units, compute_device)
    modules = dict(model.named_modules())
    where = [stream.block_of(u) for u in units]
    batches = [tokens[i:i + batch_size] for i in range(0, len(tokens), batch_size)]
    nll_fp = nll_q = kl = 0.0
    head, head_cache = [u for u, b in zip(units, where) if b is None], {}
    with stream.resident():
        quantizer = as_quantizer(quantizer)
        gptq = _GPTQChain(stream, model, plan, calibration, batch_size, quantizer) if quantizer.method == "gptq" else None
        fp = [stream.inputs(b) for b in batches]                       # (hidden, block arguments)
        with _fake_quantized(modules, head if gptq is None else [], plan, head_cache, quantizer.grid):    # a head tied to the
            q = [stream.inputs(b)[0] for b in batches]                                     # embeddings (RTN)
        for i in tqdm(range(len(stream.blocks)), desc="eval (streamed)", leave=False, disable=not progress):
            block_units = [u for u, b in zip(units, where) if b == i]
            with stream.block_on_device(i):
                fp_next = [stream.run_block(i, h, extra) for h, extra in fp]
                if gptq is None:
                    with _fake_quantized(modules, block_units, plan, grid=quantizer.grid):
                        q = [stream.run_block(i, h, extra) for h, (_, extra) in zip(q, fp)]
                else:
                    with _Restored(modules, block_units):
                        gptq.quantize(i, block_units)
                        q = [stream.run_block(i, h, extra) for h, (_, extra) in zip(q, fp)]
            fp = [(h, extra) for h, (_, extra) in zip(fp_next, fp)]
        if gptq is not None and head:
            head_cache = gptq.quantize_head(modules, head)
        from .models.head import Head, vocab_size
        lm_head = Head(stream, vocab_size(model))          # a few positions at a time: no window's full logits
        for (h, _), hq, batch in zip(fp, q, batches):
            batch = batch.to(h.device)
            nll_fp += float(lm_head.nll(h, batch).sum())
            b_nll, b_kl = lm_head.nll_kl(h, hq, batch, head=lambda: _fake_quantized(modules, head, plan, head_cache, quantizer.grid))
            nll_q, kl = nll_q + float(b_nll.sum()), kl + float(b_kl.sum())
    n = len(tokens)
    return Scores(math.exp(nll_fp / n), 0.0, None), Scores(math.exp(nll_q / n), kl / n, None)


def score_plans(prepared, tokens, plans, quantizer: str, stream: str = "auto", each=None) -> list:
    """[("fp", None, Scores), (label, plan, Scores), ...] on ``tokens``. A causal LM with decoder blocks is
    scored one block at a time (evaluate.streamed_scores; RTN, or GPTQ unless the LM head is tied to the
    embeddings) with --stream on, when its weights stay on the host, or auto when the whole path's copy of the
    unit weights would pass 1 GiB (it keeps no logits, whatever the vocabulary: see Evaluator). ``each(row)``
    is called with every row as soon as it is scored (sweep writes its CSV as it goes)."""
    def add(rows, row):
        rows.append(row)
        if each is not None:
            each(row)
    from .sensitivity.base import STREAM_ABOVE_BYTES, tied_to_embeddings
    from .units import find_blocks
    model, units = prepared.model, prepared.units
    can_stream = prepared.kind == "causal_lm" and bool(find_blocks(model, units)) \
        and not any(u.kind == "embedding" for u in units) and (quantizer == "rtn" or not tied_to_embeddings(model, units))
    host_weights = getattr(prepared, "compute_device", None) is not None
    if (stream == "on" or host_weights) and not can_stream:
        why = "the weights stay on the host (the model does not fit the GPU), and " if host_weights else "--stream on: "
        raise BitallocError(f"{why}only causal LMs with decoder blocks, no quantized embeddings and (for GPTQ) an "
                            "LM head not tied to the embeddings are scored block by block: leave --stream out, or "
                            "drop the embedding units from --include")
    if host_weights:
        stream = "on"
    if stream == "auto" and can_stream:
        copies = sum(u.numel for u in units) * next(model.parameters()).element_size()
        stream = "on" if copies > STREAM_ABOVE_BYTES else "off"
    if stream == "on":
        rows = []
        for label, plan in plans:
            fp, scores = streamed_scores(model, units, tokens, plan, quantizer=quantizer, calibration=prepared.tokens,
                                         compute_device=getattr(prepared, "compute_device", None))
            if not rows:
                add(rows, ("fp", None, fp))
            add(rows, (label, plan, scores))
        return rows
    evaluator = Evaluator(model, prepared.kind, prepared.units, tokens)
    rows: list = []
    add(rows, ("fp", None, evaluator.fp))
    for label, plan in plans:
        add(rows, (label, plan, evaluator.score_plan(plan, quantizer, prepared.tokens, desc=f"eval {label}",
                                                     progress=True)))
    return rows
