"""Request and response bodies of the /v1 API (pydantic), mirroring the data model."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ModelIn(BaseModel):
    """POST /v1/models: a folder or .gguf file under the server's --models-root."""
    model_config = ConfigDict(extra="forbid")
    path: str = Field(max_length=1024, description="relative to --models-root (or absolute inside it)")
    name: str | None = Field(None, max_length=64, description="the model's id (default: the folder name)")


class ModelOut(BaseModel):
    id: str
    architecture: str
    hash: str
    n_params: int
    n_units: int
    path: str


class PlanIn(BaseModel):
    """POST /v1/plans: the arguments of `bitalloc allocate`. A stored table answers at once; ``check`` (score the
    plan on calibration windows against the plan without widths below the budget's floor; for a row plan also
    against the layer plan) and ``refine`` make the plan on the model, in a job, as do the solvers that score plans on it
    (evolutionary, optuna)."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=64, description="a registered model's id")
    budget_bits: float | None = Field(None, gt=0, le=32, description="average TRUE bits per weight (or size)")
    size: int | str | None = Field(None, description="instead of budget_bits: the output's bytes, e.g. 240MB (a "
                                                     "GGUF file with target llama.cpp, or a compressed-tensors / GPTQ "
                                                     "folder)")
    format: Literal["gguf", "compressed-tensors", "gptq"] | None = Field(
        None, description="the output size counts (default: the target's)")
    memory: int | str | None = Field(None, description="instead of budget_bits: what llama.cpp holds in all at "
                                                      "context tokens, e.g. 1GiB (target llama.cpp)")
    context: int | None = Field(None, ge=1, description="with memory: the context length it must hold")
    kv_type: Literal["f16", "q8_0", "q4_0"] = Field("f16", description="with memory: llama.cpp's KV cache type")
    batch: int = Field(1, ge=1, le=4096, description="with memory: sequences held at once")
    effort: Literal["fast", "balanced", "best"] | float | None = Field(
        None, description="sets probe, quantizer, n_windows, check and refine where left out (default balanced)")
    granularity: Literal["layer", "row"] = "layer"
    solver: str | None = Field(None, description="ilp, closed_form, uniform (row: closed_form, greedy, ilp); "
                                                 "default ilp per layer, closed_form per row")
    probe: str | None = Field(None, description="default: the effort's (kfac; fisher on MoE models)")
    quantizer: Literal["rtn", "gptq"] | None = None
    fuse: bool = False
    experts: Literal["per-expert", "per-layer"] | None = None
    options: str | None = Field(None, max_length=200, description="e.g. 2,3,4,8 or ggml (default 2,3,4,8)")
    group_size: int | None = Field(None, ge=1, le=65536)
    symmetric: bool | None = None
    n_windows: int | None = Field(None, ge=1, le=100000)
    seq_len: int | None = Field(None, ge=1, le=1 << 20)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] | None = None
    target: Literal["vllm", "llama.cpp", "transformers"] | None = Field(
        None, description="only what this engine serves fast (sets options, symmetric, fuse, experts)")
    check: bool | None = Field(None, description="default: the effort's (on; fast: off)")
    refine: float | None = Field(None, gt=0, le=3600, description="seconds of EvoPress search on the model")
    generations: int | None = Field(None, ge=1, le=100000, description="evolutionary: generations; optuna: trials")
    time_limit: float | None = Field(None, gt=0, le=3600, description="evolutionary/optuna: seconds")
    seed: int | None = None

    @field_validator("probe")
    @classmethod
    def _probe(cls, v):
        from ..registry import PROBES
        if v is not None and v not in PROBES:
            raise ValueError(f"unknown probe {v!r}: choose one of {', '.join(PROBES)}")
        return v

    @field_validator("solver")
    @classmethod
    def _solver(cls, v):
        from ..registry import SOLVERS
        choices = list(SOLVERS) + ["greedy"]
        if v is not None and v not in choices:
            raise ValueError(f"unknown solver {v!r}: choose one of {', '.join(choices)}")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        if v is not None:
            from ..errors import BitallocError
            from ..options import parse_options
            try:
                parse_options(v)
            except BitallocError as e:           # names the bad width
                raise ValueError(str(e)) from None
        return v


class CheckpointIn(BaseModel):
    """POST /v1/plans/{id}/checkpoints: the plan written for a serving engine, as `bitalloc apply --format`."""
    model_config = ConfigDict(extra="forbid")
    format: Literal["bitalloc", "gptq", "compressed-tensors", "gguf"] = "bitalloc"
    quantizer: Literal["rtn", "gptq"] | None = Field(None, description="default: the plan's own (gguf: rtn is its "
                                                                       "importance-weighted K-quant search, gptq "
                                                                       "GPTQ on the K-quant grid)")


class JobOut(BaseModel):
    id: str
    state: str
    progress: dict
    attempts: int
    worker: str | None
    error: str | None
    table_id: str | None
    plan_id: str | None
    kind: str
    model: str
    poll: str
    checkpoint: str | None = Field(None, description="an apply job's output, on its worker's machine")
