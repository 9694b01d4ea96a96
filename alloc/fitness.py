"""Fitness of a whole plan, measured on the model: what the search stages (refine, evolutionary, optuna) minimize.

    fitness(choice, n_windows) -> mean KL(fp ‖ plan) per token on the first n_windows calibration windows

``choice`` gives, per unit, an option index (a layer plan) or a tensor of option indices, one per output row
(a row plan). ``KLFitness`` quantizes each unit under each option once, with the plan's quantizer (RTN, or GPTQ
on the unit's own XᵀX from the fp model; both round every output row on its own, so a row plan's weight is
put together row by row from those; GPTQ's XᵀX comes from calibration windows the fitness does not score,
``HESSIAN_WINDOWS`` of them after its own, since GPTQ fits the windows it sees: sensitivity/gram.py), keeps them in an LRU cache of ``CACHE_BYTES`` in the model's dtype, and
writes into the model only the units whose choice changed since the last call. The fp reference is the
windows' final hidden states (no logits are kept: 537 MB per window for Gemma-3's 262k vocabulary); the KL
is taken by the LM head a few positions at a time (alloc/models/head.py), at every ``stride``-th position.

``StreamedKLFitness`` gives the same numbers one decoder block at a time, with no weight copy at all (RTN;
``make_fitness`` picks it for large models and for weights kept on the host).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from tqdm import tqdm

from .evaluate import _Holding
from .quantize import Quantizer, as_quantizer
from .units import set_unit_weight, unit_weight

CACHE_BYTES = 2 << 30            # quantized weights kept between calls (per unit and option)
HESSIAN_WINDOWS = 32             # calibration windows after the scored ones on which GPTQ's XᵀX is collected
REF_LOGITS_BYTES = 1 << 30       # the reference's logits (at the fitness's positions) are kept up to this size
HESSIAN_BYTES = 1 << 30          # GPTQ's prepared XᵀX (inverse factors) kept between calls


class KLFitness:
    def __init__(self, prepared, *, max_windows: int | None = None, quantizer: "str | Quantizer" = "rtn",
                 stride: int = 1, grams: dict | None = None):
        from .evaluate import final_states, head_of
        self.workload = prepared.workload
        if max_windows is not None:
            self.workload = self.workload.subset(max_windows)
        self.units, self.options = prepared.units, prepared.options
        self.quantizer, self.stride = as_quantizer(quantizer), stride
        self._gptq_workload = _unscored(prepared.workload, len(self.workload.tokens))
        self.max_windows = len(self.workload.tokens)
        self.modules = dict(prepared.model.named_modules())
        # the fp weights, to quantize from and to put back: in bf16 where that holds them exactly (a model
        # loaded from bf16 and widened to fp32 for this CPU: half the copy, 0.5 GB for Gemma-3-270M)
        self.fp_weights = {u.name: _compact(unit_weight(self.modules, u)) for u in self.units}
        self.dtypes = {u.name: unit_weight(self.modules, u).dtype for u in self.units}
        self.loaded: list = [None] * len(self.units)                   # None: fp weights
        self.evaluations = 0
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self._prepared: OrderedDict = OrderedDict()      # (id(XᵀX), device) -> its prepared form for GPTQ
        self._prepared_bytes = 0
        self.stream, self.head = head_of(prepared.model, self.units) if prepared.kind == "causal_lm" else (None, None)
        self._final = final_states
        outside = [u for u in self.units if self.stream is not None and self.stream.block_of(u) is None]
        # an LM head (or embedding) among the units: the reference logits need its fp weights
        self._ref_head = (lambda: _Holding(self.modules, outside, {u.name: self._fp(u.name) for u in outside})) \
            if outside else None
        self.H = self._hessians(grams) if self.quantizer.method == "gptq" else {}
        with torch.no_grad():
            self.reference = [self._outputs(b) for b in tqdm(self.workload.batches(), total=self.workload.n_batches(),
                                                              desc="fitness: fp reference", leave=False)]
            self.ref_logits = None                 # the reference's logits, kept when they are small enough
            if self.head is not None and self._ref_bytes() <= REF_LOGITS_BYTES:
                self.ref_logits = [self.head.reference(h, b, stride=stride)
                                   for h, b in zip(self.reference, self.workload.batches())]

    def _ref_bytes(self) -> int:
        T = self.workload.tokens.shape[1]
        return len(self.workload.tokens) * -(-T // self.stride) * self.head.vocab * self.reference[0].element_size()

    def _outputs(self, batch):
        return self._final(self.stream, batch) if self.head is not None else self.workload.logits(batch)

    def _hessians(self, grams: dict | None = None) -> dict[str, torch.Tensor]:
        """XᵀX of every unit (float32; units reading one input share it) on the windows after the scored ones
        (all windows when there are no others), fp model. ``grams``: those the probe collected on these windows
        (SensitivityTable.grams), used when they cover every Linear unit (one forward pass fewer)."""
        linear = [u for u in self.units if u.kind not in ("embedding", "expert", "expert_t")]
        if grams and all(u.name in grams for u in linear):
            return {u.name: grams[u.name] for u in linear if grams[u.name].shape[0] == u.shape[1]}
        from .sensitivity.output_error import hessian_hooks
        H: dict[str, torch.Tensor] = {}
        with hessian_hooks(self.modules, self.units, H) as new_batch, torch.no_grad():
            for batch in tqdm(self._gptq_workload.batches(), total=self._gptq_workload.n_batches(),
                              desc="fitness: GPTQ inputs", leave=False):
                new_batch()
                self.workload.run(batch)
        out, last = {}, None
        for u in self.units:                   # q/k/v (and gate/up) come one after another: keep one copy
            h = H.get(u.name)
            if h is None or h.dim() != 2 or h.shape[0] != u.shape[1]:
                continue                       # not the unit's own inputs (an MoE expert stack's hook): RTN
            h = h.float()
            out[u.name] = last = last if last is not None and last.shape == h.shape and torch.equal(last, h) else h
        return out

    def quantized(self, i: int, j: int) -> torch.Tensor:
        """Unit ``i``'s weight under option ``j`` by the quantizer (cached)."""
        key = (i, j)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        u = self.units[i]
        W = self._fp(u.name)
        H, spec = self.H.get(u.name), self.options[j]
        hessian = self._prepared_for(H, W.device) if self.quantizer.sweeps(spec) else None
        q = self.quantizer.fake(W, spec, H, hessian).to(W.dtype)
        self._cache[key] = q
        self._cache_bytes += q.numel() * q.element_size()
        while self._cache_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.numel() * old.element_size()
        return q

    def _prepared_for(self, H: torch.Tensor | None, device):
        """``Quantizer.prepare(H)`` on ``device`` (the weight's), kept (up to ``HESSIAN_BYTES``) for the unit's
        other widths and for the units that read the same input (q/k/v share one XᵀX object)."""
        if H is None or H.dim() != 2:
            return None
        key = (id(H), str(device))
        if key not in self._prepared:
            self._prepared[key] = self.quantizer.prepare(H, self.options, device)
            self._prepared_bytes += H.numel() * 4
            while self._prepared_bytes > HESSIAN_BYTES and len(self._prepared) > 1:
                _, old = self._prepared.popitem(last=False)
                self._prepared_bytes -= old.Hinv.numel() * 4
        self._prepared.move_to_end(key)
        return self._prepared[key]

    def weight(self, i: int, c) -> torch.Tensor:
        """Unit ``i``'s weight for choice ``c``: an option index, or one per output row."""
        if isinstance(c, torch.Tensor) and c.dim() == 1:
            options = c.unique().tolist()
            if len(options) == 1:
                return self.quantized(i, options[0])
            u = self.units[i]
            out = torch.empty(u.shape, dtype=self.dtypes[u.name])
            for j in options:
                rows = c == j
                out[rows] = self.quantized(i, j)[rows]
            return out
        return self.quantized(i, int(c))

    def _load(self, choice) -> None:
        for i, (u, c) in enumerate(zip(self.units, choice)):
            if not _same(self.loaded[i], c):
                set_unit_weight(self.modules, u, self.weight(i, c))
                self.loaded[i] = c.clone() if isinstance(c, torch.Tensor) else int(c)

    def restore(self) -> None:
        """Put the fp weights back (the model is borrowed, not owned)."""
        for i, u in enumerate(self.units):
            if self.loaded[i] is not None:
                set_unit_weight(self.modules, u, self._fp(u.name))
                self.loaded[i] = None

    def _fp(self, name: str) -> torch.Tensor:
        """Unit ``name``'s fp weight in the model's dtype."""
        return self.fp_weights[name].to(self.dtypes[name])

    resumable = True                      # takes first=: windows first..n_windows−1 only (finish.check_widths)

    @torch.no_grad()
    def __call__(self, choice, n_windows: int | None = None, first: int = 0) -> float:
        """Mean divergence over windows ``first``..``n_windows``−1 (all by default) of the plan ``choice``."""
        self._load(choice)
        n = self.max_windows if n_windows is None else min(n_windows, self.max_windows)
        total, seen, start = 0.0, 0, 0
        for k, batch in enumerate(self.workload.batches()):
            if start >= n:
                break
            rows = len(batch)
            lo, hi = max(first - start, 0), min(n - start, rows)
            start += rows
            if hi <= lo:
                continue
            batch, ref = batch[lo:hi], self.reference[k][lo:hi]
            if self.head is not None:
                logits = [r[lo:hi] for r in self.ref_logits[k]] if self.ref_logits is not None else None
                total += float(self.head.kl(ref, self._final(self.stream, batch), batch, stride=self.stride,
                                            ref=logits, ref_head=self._ref_head, rows=rows).sum())
            else:
                total += float(self.workload.divergence(ref, self.workload.logits(batch))) * len(batch)
            seen += len(batch)
        self.evaluations += 1
        return total / max(seen, 1)


def _compact(W: torch.Tensor) -> torch.Tensor:
    """A copy of ``W``: in bf16 when ``W`` is float32 holding only bf16 values (exact), else as it is."""
    W = W.detach()
    if W.dtype == torch.float32:
        half = W.to(torch.bfloat16)
        if torch.equal(half.float(), W):
            return half
    return W.clone()


def _unscored(workload, scored: int):
    """The calibration windows after the first ``scored`` (up to HESSIAN_WINDOWS), or all of them when none
    are left: where the fitness's GPTQ collects XᵀX."""
    rest = workload.tokens[scored:scored + HESSIAN_WINDOWS]
    if not len(rest):
        return workload
    return type(workload)(workload.model, rest, batch_size=workload.batch_size,
                          compute_device=workload.compute_device, units=workload.units)


def _same(loaded, c) -> bool:
    if loaded is None:
        return False
    if isinstance(loaded, torch.Tensor) or isinstance(c, torch.Tensor):
        return isinstance(loaded, torch.Tensor) and isinstance(c, torch.Tensor) and torch.equal(loaded, c)
    return loaded == int(c)


class _Choice:
    """A plan-like view of one option index per unit (what evaluate._fake_quantized reads)."""

    def __init__(self, units, options, choice):
        self.layers, self.row_bits = {}, {}
        for u, c in zip(units, choice):
            if isinstance(c, torch.Tensor) and c.dim() == 1:
                bits = torch.tensor([o.bits for o in options], dtype=torch.int8)[c]
                self.layers[u.name] = options[int(c.max())]
                self.row_bits[u.name] = bits
            else:
                self.layers[u.name] = options[int(c)]


class StreamedKLFitness:
    """``KLFitness`` one decoder block at a time (alloc/models/stream.py), for models whose weights stay on the host
    or whose fp copy would be large: each evaluation carries the windows' hidden states through every block
    with that block's units RTN-quantized by the plan (on the compute device when there is one; restored
    after), then takes the KL at the LM head against the fp final states computed once. No copy of the
    model's weights is kept; each evaluation quantizes every unit again (no loaded-option cache)."""

    def __init__(self, prepared, *, max_windows: int | None = None, stride: int = 1):
        from .models.stream import BlockStream
        self.workload = prepared.workload
        if max_windows is not None:
            self.workload = self.workload.subset(max_windows)
        self.units, self.options, self.stride = prepared.units, prepared.options, stride
        self.max_windows = len(self.workload.tokens)
        self.stream = BlockStream(prepared.model, self.units, getattr(prepared, "compute_device", None))
        self.head = self.workload.head(self.stream)
        self.modules = dict(prepared.model.named_modules())
        self.where = [self.stream.block_of(u) for u in self.units]
        self.evaluations = 0
        self.reference = self._final(None, self.max_windows)

    @torch.no_grad()
    def _final(self, choice, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch of the first ``n`` windows: (final hidden state, batch) with ``choice``'s units quantized."""
        from .evaluate import _fake_quantized
        plan = _Choice(self.units, self.options, choice) if choice is not None else None
        stream = self.stream

        def quantized(block):
            members = [u for u, b in zip(self.units, self.where) if b == block] if plan is not None else []
            return _fake_quantized(self.modules, members, plan)
        batches, seen = [], 0
        for batch in self.workload.batches():
            if seen >= n:
                break
            batches.append(batch[: n - seen].to(stream.device))
            seen += len(batches[-1])
        with stream.resident():
            with quantized(None):                                  # an LM head tied to the embeddings
                hidden = [stream.inputs(b) for b in batches]
            for i in range(len(stream.blocks)):
                with stream.block_on_device(i), quantized(i):
                    hidden = [(stream.run_block(i, h, extra), extra) for h, extra in hidden]
        return [(h, b) for (h, _), b in zip(hidden, batches)]

    def restore(self) -> None:
        """Nothing to put back: every evaluation restores the weights it quantized."""

    def __call__(self, choice, n_windows: int | None = None) -> float:
        from .evaluate import _fake_quantized
        n = self.max_windows if n_windows is None else min(n_windows, self.max_windows)
        plan = _Choice(self.units, self.options, choice)
        head = [u for u, b in zip(self.units, self.where) if b is None]
        total, seen = 0.0, 0
        with self.stream.resident():
            for (ref, _), (h, b) in zip(self.reference, self._final(choice, n)):
                kl = self.head.kl(ref[: len(b)], h, b, stride=self.stride,
                                  head=lambda: _fake_quantized(self.modules, head, plan))
                total, seen = total + float(kl.sum()), seen + len(b)
        self.evaluations += 1
        return total / seen


def make_fitness(prepared, *, max_windows: int | None = None, quantizer: "str | Quantizer" = "rtn",
                 stride: int = 1, grams: dict | None = None):
    """KLFitness, or its block-streamed twin (RTN) when the weights stay on the host or their fp copy would
    pass 1 GiB (a causal LM with decoder blocks and no embedding units)."""
    from .sensitivity.base import STREAM_ABOVE_BYTES
    from .units import find_blocks
    model, units = prepared.model, prepared.units
    can_stream = prepared.kind == "causal_lm" and bool(find_blocks(model, units)) \
        and not any(u.kind == "embedding" for u in units)
    copy_bytes = sum(u.numel for u in units) * next(model.parameters()).element_size()
    host_weights = getattr(prepared, "compute_device", None) is not None
    if can_stream and (host_weights or copy_bytes > STREAM_ABOVE_BYTES):
        if as_quantizer(quantizer).method != "rtn":
            import warnings

            from .errors import BitallocWarning
            warnings.warn("the model is scored one block at a time for the search, with RTN weights: GPTQ for every "
                          "candidate would quantize the whole model each time", BitallocWarning, stacklevel=2)
        return StreamedKLFitness(prepared, max_windows=max_windows, stride=stride)
    return KLFitness(prepared, max_windows=max_windows, quantizer=quantizer, stride=stride, grams=grams)

