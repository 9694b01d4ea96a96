"""kfac probe: the layer-output error weighted by how much each output channel matters to the loss.

Second-order loss change of a perturbation ΔW, with the Fisher of the layer factored as in K-FAC,
E[(g ⊗ x)(g ⊗ x)ᵀ] ≈ E[g gᵀ] ⊗ E[x xᵀ], and E[g gᵀ] kept diagonal:

    cost = ½ Σ_i  G_i · (ΔW H ΔWᵀ)_ii          G_i = Σ_t (∂ℓ/∂y_ti)²,  H = Σ_t x_t x_tᵀ / n_tokens

g = gradient of the summed next-token loss with respect to the layer's output y (per token), x = its input.
It keeps output_error's input correlations (H) and fisher's loss weighting (G) in one forward+backward pass.
Each term i is one output row's cost (per-row plans). ``quantizer="gptq"``: ΔW is what GPTQ does to the
unit on its own H (its error is shaped to cancel over correlated inputs, which H sees and a diagonal
Fisher does not), so the costs are those of the quantizer the plan will be applied with.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..options import QuantSpec
from ..quantize import DEFAULTS, Quantizer
from ..units import Unit, embedding_and_head, unit_weight
from .base import (Probe, Workload, check_loss, check_trainable, grads_only_for,
                   modules_by_name, refuse_experts, streams, unique_params)
from .table import SensitivityTable


def kfac_cost(W: torch.Tensor, G: torch.Tensor, Hn: torch.Tensor, options: list[QuantSpec],
              quantizer: Quantizer = DEFAULTS["rtn"], head: tuple | None = None) -> torch.Tensor:
    """(out, O) float64: ½ G_i (ΔW Hn ΔWᵀ)_ii of each output row i of one unit under each option (their sum
    is the unit's cost), ΔW = what ``quantizer`` does to W (GPTQ: on this unit's own XᵀX). ``head``: (G, Hn)
    of the output head tied to this embedding: the same ΔW costs there too, as a Linear's."""
    W = W.detach().float()
    rows = torch.zeros(W.shape[0], len(options), dtype=torch.float64)
    if Hn.dim() == 1:             # an embedding: row v is token v's vector, read by its share Hn[v] of the tokens
        return _embedding_cost(W, G, Hn, options, quantizer, head, rows)
    Hf = Hn.float()               # the products in float32 (half the time of float64), their sums in float64
    hessian = quantizer.prepare(Hf, options)      # GPTQ's inverse factor, once for all the options
    for j, spec in enumerate(options):
        rows[:, j] = 0.5 * G * quantizer.error_rows(W, spec, Hf, hessian)
    return rows


KEEP_GRAMS_BYTES = 1 << 30      # the units' XᵀX kept for the checks' GPTQ (SensitivityTable.grams) up to this size
EMBEDDING_SAMPLE = 1 << 15       # rows of a tied embedding no calibration token reads, priced by a sample this big


def _embedding_cost(W, G, Hn, options, quantizer, head, rows) -> torch.Tensor:
    """kfac_cost of an embedding. A row no calibration token reads costs nothing as a lookup; as the tied
    head's row it costs at every position. Those rows are priced on an even sample (every k-th of them, its
    cost times k): rounding Gemma's 262k × 640 embedding 10 ways took minutes; the sum keeps its expectation."""
    read = Hn > 0
    if head is None:
        take, weight = read.nonzero().squeeze(1), None
    else:
        unread = (~read).nonzero().squeeze(1)
        k = max(1, len(unread) // EMBEDDING_SAMPLE)
        sample = unread[::k]
        take = torch.cat([read.nonzero().squeeze(1), sample])
        weight = torch.ones(len(take), dtype=torch.float64)
        weight[len(take) - len(sample):] = len(unread) / max(len(sample), 1)
    step = max(1, (1 << 23) // W.shape[1])         # rows at a time: a 262k-row embedding is never copied whole
    head_H = head[1].float() if head is not None else None
    for j, spec in enumerate(options):
        for r in range(0, len(take), step):
            idx = take[r:r + step]
            w = W[idx]
            dW = quantizer.fake(w, spec, None) - w                      # each row is rounded on its own
            cost = 0.5 * Hn[idx] * (dW.double().pow(2) @ G)
            if head is not None:
                cost += 0.5 * head[0][idx] * ((dW @ head_H) * dW).sum(1, dtype=torch.float64) * weight[r:r + step]
            rows[idx, j] = cost
    return rows


def squares(g: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of g², per output (float64), a few rows at a time: a 262k-wide logits gradient is never
    copied whole."""
    g = g.detach().reshape(-1, g.shape[-1])
    step = max(1, (1 << 24) // g.shape[1])
    return sum(c.float().pow(2).sum(0).double() for c in g.split(step))


class KFACCollector:
    """kfac under block streaming (streamed.py): input XᵀX and squared output gradients of a block's units."""

    def __init__(self, model, options: list[QuantSpec], workload: Workload, quantizer: Quantizer = DEFAULTS["rtn"]):
        self.modules, self.options, self.quantizer = modules_by_name(model, []), options, quantizer
        _, head, tied = embedding_and_head(model)
        self.tied_head = head if tied else None   # the output head reads the embedding's weight (Gemma, tied models)
        self.rows: dict[int, torch.Tensor] = {}           # unit index -> (out, O) row costs
        self.terms = getattr(workload, "loss_terms", lambda batch: 1)     # how many terms the loss averages
        self.H: dict[str, torch.Tensor] = {}
        self.G: dict[str, torch.Tensor] = {}
        self.n_tokens = 0
        self.grams: dict[str, torch.Tensor] = {}          # unit name -> float32 XᵀX / tokens (shared by q/k/v)
        self._last = None                                 # (the last summed XᵀX, its kept copy)
        self._gram_bytes = 0

    def params(self, units):
        return []                                   # only activations and their gradients

    @contextlib.contextmanager
    def collect(self, units):
        """Forward hooks add each unit's Σ xᵀx to H and hook its output's gradient into G. The embedding's and
        the tied head's statistics are added only when that gradient arrives, so a forward whose output the
        loss never reads (the block stand-ins' re-run of the embedding, a checkpointed head chunk's
        recomputation) counts nothing. Units reading one input tensor (q/k/v) share its product while the
        tensor lives."""
        seen: dict[int, torch.Tensor] = {}

        def hook(name, kind):
            def fn(module, args, output):
                x = args[0]
                if kind == "embedding":           # a one-hot input: XᵀX is the diagonal of token counts
                    counts = torch.bincount(x.reshape(-1), minlength=module.weight.shape[0]).double()
                    scale = float(getattr(module, "embed_scale", 1.0))      # Gemma scales its embeddings by √d
                    h = counts * scale ** 2
                else:
                    if id(x) not in seen:
                        x2 = x.detach().reshape(-1, x.shape[-1]).float()
                        seen[id(x)] = (x2.T @ x2).double()
                        weakref.finalize(x, seen.pop, id(x), None)  # gone with x: an id is never reused stale
                    h = seen[id(x)]

                # the embedding and the tied head also run where the loss never reads them: their statistics
                # wait for the gradient; a decoder layer's are added now (its XᵀX need not live until backward)
                defer = kind in ("embedding", "head")
                if not defer:
                    self.H[name] = self.H.get(name, 0) + h

                def arrived(g):
                    if defer:
                        self.H[name] = self.H.get(name, 0) + h
                    self.G[name] = self.G.get(name, 0) + squares(g)
                if output.requires_grad or not defer:
                    output.register_hook(arrived)
            return fn

        handles = [self.modules[u.module_name].register_forward_hook(hook(u.name, u.kind)) for u in units]
        handles += [self.tied_head.register_forward_hook(hook(f"{u.name} (head)", "head"))
                    for u in units if u.kind == "embedding" and self.tied_head is not None]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            seen.clear()

    def reduce(self, cost, rows, units, steps):
        for j, u in zip(rows, units):
            head = None
            if f"{u.name} (head)" in self.G:
                head = (self.G.pop(f"{u.name} (head)"), self.H.pop(f"{u.name} (head)") / self.n_tokens)
            H = self.H.pop(u.name)
            Hn = H / self.n_tokens
            self.rows[j] = kfac_cost(unit_weight(self.modules, u), self.G.pop(u.name), Hn, self.options,
                                     self.quantizer, head)
            cost[j] = self.rows[j].sum(0)
            self._keep(u.name, H, Hn)
        self._last = None

    def _keep(self, name: str, H: torch.Tensor, Hn: torch.Tensor) -> None:
        """Keep a Linear unit's XᵀX for the checks (one copy per input tensor), while the total stays small."""
        if Hn.dim() != 2:
            return
        last = self._last[0] if self._last is not None else None
        same = self._last[1] if last is not None and last.shape == H.shape and torch.equal(last, H) else None
        if same is None:
            if self._gram_bytes + Hn.numel() * 4 > KEEP_GRAMS_BYTES:
                return
            same = Hn.float()
            self._gram_bytes += same.numel() * 4
        self.grams[name] = same
        self._last = (H, same)                   # q/k/v (gate/up) come one after another with one XᵀX

    def row_table(self, n_units: int) -> torch.Tensor:
        """The row costs of units 0..n_units−1, one after another (SensitivityTable.row_cost)."""
        return torch.cat([self.rows[j] for j in range(n_units)])

    def loss_scale(self, batch):
        self.n_tokens += batch.numel()
        return self.terms(batch)                    # the summed per-token loss


@dataclass(frozen=True)
class KFACProbe(Probe):
    name = "kfac"
    needs_grad = True
    gives_rows = True
    micro_batch: int = 4
    stream: str = "auto"                  # one decoder block at a time (streamed.py): auto, on, off
    quantizer: str = "rtn"                # whose ΔW the costs measure: rtn, or gptq (on each unit's own XᵀX)

    def measure(self, workload: Workload, units: list[Unit], options: list[QuantSpec]) -> SensitivityTable:
        model = workload.model
        refuse_experts(units, self.name)
        if streams(workload, units, self.stream):
            from .streamed import streamed_costs
            collector = KFACCollector(model, options, workload, self.rounding)
            cost, _ = streamed_costs(workload, units, options, collector, micro_batch=self.micro_batch,
                                     desc="kfac (streamed)")
            table = self.table(units, options, cost, collector.row_table(len(units)), n_tokens=collector.n_tokens,
                               streamed=True)
            table.grams = collector.grams
            return table
        check_trainable(model, units)
        collector = KFACCollector(model, options, workload, self.rounding)
        first = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        handles = []
        if first is not None:  # gradients must flow to every layer although no weight requires them
            handles.append(first.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        # a plain module without an embedding hook: let the units' weights carry the graph
        carriers = [] if first is not None else unique_params(model, units)[0]
        tokens = torch.cat(list(workload.batches()))
        try:
            with grads_only_for(model, carriers), collector.collect(units):
                for i in tqdm(range(0, len(tokens), self.micro_batch), desc="kfac", leave=False):
                    batch = tokens[i:i + self.micro_batch]
                    scale = collector.loss_scale(batch)                        # the summed per-token loss
                    loss = workload.backward(batch, scale) if hasattr(workload, "backward") else None
                    if loss is None:
                        loss = workload.loss(batch)
                        (loss * scale).backward()
                    check_loss(loss, f"calibration windows {i}..{i + len(batch) - 1}")
        finally:
            for h in handles:
                h.remove()
        n_tokens = collector.n_tokens
        cost = torch.zeros(len(units), len(options), dtype=torch.float64)
        collector.reduce(cost, list(range(len(units))), units, 0)
        table = self.table(units, options, cost, collector.row_table(len(units)), n_tokens=n_tokens, streamed=False)
        table.grams = collector.grams
        return table
