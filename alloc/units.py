"""Which weights are quantizable, and which of them must share a width.

A Unit is one weight matrix seen as (out_features, in_features):
    linear      an ``nn.Linear`` (also fused projections such as Phi-3's ``qkv_proj``/``gate_up_proj``)
    conv1d      a GPT-2 ``Conv1D`` (weight stored (in, out), handled here)
    embedding   an ``nn.Embedding`` (rows = tokens), only when named in ``include``
    expert      one expert of an MoE layer whose experts live in a 3-D parameter (E, out, in), as in
                transformers 5.x (``mlp.experts.gate_up_proj``); ``expert_t`` when stored (E, in, out)
                (GPT-OSS). With ``experts="per-layer"`` the unit is the whole stack (E·out, in): one width
                for every expert of that projection, as llama.cpp's merged ``ffn_*_exps`` tensors need.
Expert units are named ``{experts module}.{e}.{parameter}`` (``model.layers.0.mlp.experts.3.down_proj``),
per-layer ones ``{experts module}.{parameter}``.

Embeddings and the LM head stay in full precision unless named in ``include``; MoE routers stay in full
precision always. Every other matrix weight inside the decoder blocks must be covered by a unit or
excluded by name (``exclude``): ``find_units`` refuses a model with weights it would silently skip.

Fused groups are siblings that read the same input (q/k/v, gate/up); ``--fuse`` makes a solver give them
one width, which lets a runtime fuse their matmuls.
"""
from __future__ import annotations

import fnmatch
import itertools
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import BitallocError

# Sibling names that read the same input, per family (Llama/Mistral/Qwen2/OPT, BERT, Mixtral-style experts).
FUSED_SIBLINGS = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("qkv", ("query", "key", "value")),
    ("gate_up", ("gate_proj", "up_proj")),
    ("gate_up", ("w1", "w3")),
)
HEAD_NAMES = ("lm_head", "embed_out", "output")
HEAD_PARENTS = ("pooler",)          # BERT's pooler feeds only the (unused) CLS head, not sentence embeddings
ROUTER_NAMES = ("router", "gate", "shared_expert_gate")   # MoE routing weights: kept in full precision
EXPERT_MODES = ("per-expert", "per-layer")
EXPERT_KINDS = ("expert", "expert_t")


@dataclass(frozen=True)
class Unit:
    """A quantizable weight: ``name`` as in ``model.named_modules()`` (expert units: see the module
    docstring), ``shape`` = (out, in). ``owner``/``param``/``expert`` locate expert weights."""

    name: str
    shape: tuple[int, int]
    kind: str = "linear"                 # linear, conv1d, embedding, expert, expert_t
    fused_group: str | None = None
    owner: str | None = None             # module holding the weight (None: the module called ``name``)
    param: str = "weight"
    expert: int | None = None            # expert index; None with an expert kind: the whole stack

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def module_name(self) -> str:
        return self.owner or self.name

    def to_json(self) -> dict:
        return {k: (list(v) if k == "shape" else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> Unit:
        return cls(**{**d, "shape": tuple(d["shape"])})


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def unit_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def unit_slice(param: torch.Tensor, unit: Unit) -> torch.Tensor:
    """The (out, in) matrix of ``unit`` in a tensor shaped like its raw parameter (the weight itself, its
    gradient, its Fisher): a view, except for the whole stack of transposed experts."""
    if unit.kind == "conv1d":
        return param.t()
    if unit.kind == "expert":
        return param[unit.expert] if unit.expert is not None else param.reshape(-1, param.shape[-1])
    if unit.kind == "expert_t":
        if unit.expert is not None:
            return param[unit.expert].t()
        return param.transpose(1, 2).reshape(-1, param.shape[1])
    return param


def unit_param(modules: dict[str, nn.Module], unit: Unit) -> torch.Tensor:
    """The raw parameter that holds ``unit`` (shared by every expert of a stack)."""
    return getattr(modules[unit.module_name], unit.param)


def unit_weight(modules: dict[str, nn.Module], unit: Unit) -> torch.Tensor:
    """``unit``'s weight as (out, in)."""
    return unit_slice(unit_param(modules, unit), unit)


def set_unit_weight(modules: dict[str, nn.Module], unit: Unit, value: torch.Tensor) -> None:
    """Write an (out, in) matrix into ``unit``'s place in its parameter (cast to the parameter's dtype)."""
    p = unit_param(modules, unit)
    value = value.to(p.dtype)
    with torch.no_grad():
        if unit.kind in EXPERT_KINDS and unit.expert is None:
            E = p.shape[0]
            if unit.kind == "expert":
                p.copy_(value.view(p.shape))
            else:
                p.copy_(value.view(E, p.shape[2], p.shape[1]).transpose(1, 2))
        else:
            unit_slice(p, unit).copy_(value)


def embedding_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, bool]:
    """(token embedding, output head, whether the head reads the embedding's weight), by the model's own
    accessors (None where it has none)."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    return emb, head, emb is not None and head is not None and head.weight is emb.weight


def _head_names(model: nn.Module) -> set[str]:
    heads = set()
    _, out, _ = embedding_and_head(model)
    for name, module in model.named_modules():
        parts = name.split(".")
        if module is out or parts[-1] in HEAD_NAMES or any(p in HEAD_PARENTS for p in parts[:-1]):
            heads.add(name)
    return heads


def _is_router(name: str, modules: dict[str, nn.Module]) -> bool:
    """A routing layer of an MoE block: named router/gate, beside experts (or not a Linear at all)."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in ROUTER_NAMES:
        return False
    siblings = {n.rpartition(".")[2] for n in modules if n.rpartition(".")[0] == parent}
    return bool(siblings & {"experts", "shared_expert", "shared_experts"}) or unit_kind(modules[name]) is None


def _expert_units(name: str, module: nn.Module, mode: str) -> list[Unit]:
    """Units of a module that keeps its experts in 3-D parameters (E, out, in) or (E, in, out)."""
    if unit_kind(module) is not None or isinstance(module, nn.modules.conv._ConvNd):
        return []
    transposed = bool(getattr(module, "is_transposed", False))
    kind = "expert_t" if transposed else "expert"
    units = []
    for pname, p in module.named_parameters(recurse=False):
        if p.dim() != 3 or not torch.is_floating_point(p) or pname.endswith("bias"):
            continue
        E, a, b = p.shape
        out_f, in_f = (b, a) if transposed else (a, b)
        if mode == "per-layer":
            units.append(Unit(f"{name}.{pname}", (E * out_f, in_f), kind, None, name, pname, None))
        else:
            units += [Unit(f"{name}.{e}.{pname}", (out_f, in_f), kind, None, name, pname, e) for e in range(E)]
    return units


def find_units(model: nn.Module, *, include: tuple[str, ...] | list[str] = (), fuse: bool = True,
               experts: str = "per-expert", exclude: tuple[str, ...] | list[str] = (),
               check_coverage: bool = True) -> list[Unit]:
    """Quantizable units in module order.

    Default: every Linear/Conv1D except the LM head and MoE routers, and every expert of 3-D expert
    parameters (``experts``: per-expert or per-layer). ``include`` adds modules by name or glob pattern
    (``lm_head``, ``model.embed_tokens``); ``exclude`` keeps modules (or expert parameters, by unit name)
    in full precision. ``fuse`` fills ``Unit.fused_group``. ``check_coverage``: refuse a model whose decoder
    blocks hold matrix weights that are neither units nor excluded (see :func:`uncovered_weights`).
    """
    if experts not in EXPERT_MODES:
        raise BitallocError(f"unknown --experts {experts!r}: choose per-expert or per-layer")
    heads = _head_names(model)
    modules = dict(model.named_modules())
    chosen: dict[str, str] = {}
    for name, module in modules.items():
        kind = unit_kind(module)
        if kind in ("linear", "conv1d") and name not in heads and not _is_router(name, modules):
            chosen[name] = kind
    for pattern in include:
        matches = [n for n in modules if n and (n == pattern or fnmatch.fnmatchcase(n, pattern))]
        if not matches:
            raise BitallocError(f"--include {pattern!r} matches no module of this model: use names from model.named_modules()")
        for name in matches:
            kind = unit_kind(modules[name])
            if kind is None:
                if any(unit_kind(m) for m in modules[name].modules()):
                    continue  # a container: its layers are matched by their own names
                raise BitallocError(
                    f"--include {name!r} is a {type(modules[name]).__name__}, which bitalloc cannot quantize: "
                    "include only Linear, Conv1D or Embedding layers")
            chosen[name] = kind
    units = []
    for name, module in modules.items():
        if name in chosen:
            kind = chosen[name]
            w = module.weight.t() if kind == "conv1d" else module.weight
            if not torch.is_floating_point(w):
                raise BitallocError(f"layer {name!r} holds {w.dtype} weights, not floats: it is quantized already")
            units.append(Unit(name, (int(w.shape[0]), int(w.shape[1])), kind,
                              _fused_group(name, chosen) if fuse else None))
        elif not _is_router(name, modules):
            units += _expert_units(name, module, experts)
    units = _without_excluded(units, exclude, [n for n, _ in model.named_parameters()])
    if not units:
        raise BitallocError("the model has no Linear layers to quantize: pass a model with nn.Linear/Conv1D layers")
    if experts == "per-layer" and not any(u.kind in EXPERT_KINDS for u in units):
        raise BitallocError("--experts per-layer was given, but this model has no MoE experts: leave --experts out")
    if check_coverage:
        missing = uncovered_weights(model, units, exclude)
        if missing:
            shown = ", ".join(f"{n} {tuple(s)}" for n, s in missing[:4]) + (" …" if len(missing) > 4 else "")
            raise BitallocError(f"{len(missing)} matrix weight(s) in the decoder blocks are not covered by any "
                                f"unit: {shown}; bitalloc cannot quantize them, pass --exclude with their module "
                                "names to keep them in full precision")
    return units


def _matches(name: str, patterns) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def _without_excluded(units: list[Unit], exclude, param_names: list[str]) -> list[Unit]:
    for pattern in exclude:
        if not any(_matches(n, [pattern]) for n in [u.name for u in units] + param_names):
            raise BitallocError(f"--exclude {pattern!r} matches no unit or weight of this model: use names the plan "
                                "or the coverage error lists")
    return [u for u in units if not _matches(u.name, exclude)]


def decoder_matrices(model: nn.Module, units: list[Unit]) -> dict[str, torch.Tensor]:
    """Every matrix weight inside the decoder blocks (floating parameters of ≥ 2 dims, biases aside):
    full parameter name -> parameter."""
    out = {}
    for block_name, block in find_blocks(model, units):
        for pname, p in block.named_parameters():
            if p.dim() >= 2 and torch.is_floating_point(p) and not pname.endswith("bias"):
                out[f"{block_name}.{pname}"] = p
    return out


def uncovered_weights(model: nn.Module, units: list[Unit], exclude=()) -> list[tuple[str, tuple]]:
    """Matrix weights inside the decoder blocks that no unit covers and that are neither routers nor
    excluded: (parameter name, shape)."""
    modules = dict(model.named_modules())
    covered = {(u.module_name, u.param) for u in units}
    out = []
    for full, p in decoder_matrices(model, units).items():
        owner, _, leaf = full.rpartition(".")
        if (owner, leaf) in covered or _is_router(owner, modules) or _matches(owner, exclude) \
                or _matches(full, exclude):
            continue
        out.append((full, tuple(p.shape)))
    return out


def _fused_group(name: str, chosen: dict[str, str]) -> str | None:
    parent, _, leaf = name.rpartition(".")
    for tag, siblings in FUSED_SIBLINGS:
        if leaf in siblings and sum(f"{parent}.{s}" in chosen for s in siblings) > 1:
            return f"{parent}.{tag}" if parent else tag
    return None


def find_blocks(model: nn.Module, units: list[Unit] | None) -> list[tuple[str, nn.Module]]:
    """The repeated blocks (decoder layers) that hold the units: the ModuleList covering the most units
    (``units`` None, e.g. a packed model: the ModuleList holding the most weights)."""
    best: list[tuple[str, nn.Module]] = []
    best_count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            prefix = f"{name}."
            if units is None:
                count = sum(t.numel() for t in itertools.chain(module.parameters(), module.buffers()))
            else:
                count = sum(u.module_name.startswith(prefix) for u in units)
            if count > best_count:
                best_count = count
                best = [(f"{name}.{i}", child) for i, child in enumerate(module)]
    return best


SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def check_weights(model: nn.Module, units: list[Unit]) -> None:
    """Every unit's weight is a float the quantizers and kernels take (bf16, fp16, fp32, fp64) with no NaN/Inf."""
    modules = dict(model.named_modules())
    for unit in units:
        W = unit_weight(modules, unit)
        if W.dtype not in SOURCE_DTYPES:
            raise BitallocError(f"layer {unit.name!r} holds {str(W.dtype).removeprefix('torch.')} weights: bitalloc "
                                "quantizes from bf16, fp16, fp32 or fp64 weights; convert the model first "
                                "(model.to(torch.bfloat16), or a bf16 checkpoint)")
        if not torch.isfinite(W).all():
            raise BitallocError(f"layer {unit.name!r} has NaN or Inf weights: fix or re-export the checkpoint first")


def planned_units(model: nn.Module, plan) -> list[Unit]:
    """The model's units as the plan was made: with the include/exclude/experts settings it records
    (``extra["scope"]``), else the default units plus any the plan names (e.g. lm_head), MoE experts per expert
    or per layer as the plan has them. Every one must be planned: a plan that leaves units out is refused,
    never packed in part (name them in ``--exclude`` when making the plan to keep them in full precision)."""
    scope = plan.extra.get("scope")
    if isinstance(scope, dict):
        units = find_units(model, include=tuple(scope.get("include", ())), exclude=tuple(scope.get("exclude", ())),
                           experts=scope.get("experts", "per-expert"), fuse=False, check_coverage=False)
        plan.check_units(units)
        return units
    names = {n for n, _ in model.named_modules()}
    extra = tuple(n for n in plan.layers if n in names)
    units = find_units(model, include=extra, fuse=False, check_coverage=False)
    if any(u.kind in EXPERT_KINDS and u.name not in plan.layers for u in units):
        stacks = find_units(model, include=extra, fuse=False, check_coverage=False, experts="per-layer")
        if any(u.kind in EXPERT_KINDS and u.name in plan.layers for u in stacks):
            units = stacks
    plan.check_units(units)
    return units
