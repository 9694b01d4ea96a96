"""Probes scaled out with torch.distributed (``torchrun --nproc-per-node N -m bitalloc probe …``).

Each rank measures its share of the calibration micro-batches (micro-batch j goes to rank j mod N); a
probe's table is a mean over samples, so each rank's table is weighted by its sample count, the weighted
tables are summed with one all_reduce, and rank 0 divides by the total, caches and writes the result. The
table equals the single-process one up to the order of floating-point additions. Backend: NCCL when the
ranks run on CUDA, gloo on the CPU. Ranks first check that they loaded the same model, data, units and
options (one line naming what differs, nothing written).
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch

from ..errors import BitallocError


def world() -> tuple[int, int]:
    """(rank, world size) from the environment torchrun sets; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_device(device: str) -> str:
    """Each rank on its own GPU: cuda -> cuda:LOCAL_RANK."""
    return f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if device == "cuda" else device


def init(device: str) -> None:
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=30))


def check_agreement(fields: dict[str, str]) -> None:
    """Every rank must hold the same ``fields`` (model hash, data hash, …); the first that differs is named."""
    import torch.distributed as dist
    gathered: list[dict] = [None] * dist.get_world_size()          # type: ignore[list-item]
    dist.all_gather_object(gathered, fields)
    for key in fields:
        values = {g[key] for g in gathered}
        if len(values) > 1:
            raise BitallocError(f"torchrun ranks disagree on the {key} ({len(values)} different values): start "
                                "every rank with the same --model, --calib and options")


def shard(tokens: torch.Tensor, rank: int, size: int, micro_batch: int = 1) -> torch.Tensor:
    """The windows of the micro-batches j ≡ rank (mod size), in order (a partial last micro-batch stays last)."""
    batches = [tokens[i:i + micro_batch] for i in range(0, len(tokens), micro_batch)]
    if len(batches) < size:
        raise BitallocError(f"{len(batches)} calibration micro-batch(es) for {size} ranks: give at least one "
                            "per rank (--n-windows) or start fewer processes")
    return torch.cat(batches[rank::size])


def measure_distributed(prepared, probe: str, settings: dict | None, cache: bool):
    """The probe's table over all ranks' windows: the table on rank 0, None elsewhere."""
    import torch.distributed as dist

    from ..table_cache import lookup, store, table_path
    from ..calibration import data_hash
    from ..sensitivity import SensitivityTable, get_probe
    rank, size = dist.get_rank(), dist.get_world_size()
    probe_obj = get_probe(probe, **(settings or {}))
    if probe_obj.samples_meta is None:
        raise BitallocError(f"the {probe} probe cannot be split over torchrun ranks (its table is not a mean over "
                            "samples): use --probe fisher or output_error, or run one process")
    check_agreement({"model hash": prepared.info["hash"], "calibration data": data_hash(prepared.tokens),
                     "units": str([(u.name, u.shape) for u in prepared.units]),
                     "options": str(prepared.options), "probe": f"{probe} {probe_obj.settings()}"})
    path = table_path(prepared, probe, probe_obj.settings())
    hit = [lookup(path, prepared, probe_obj.gives_rows) if cache and rank == 0 else None]
    found = [hit[0] is not None]
    dist.broadcast_object_list(found, src=0)
    if found[0]:                  # validated as measure() validates a hit (table_cache.lookup)
        return hit[0] if rank == 0 else None
    tokens = prepared.tokens
    max_windows = getattr(probe_obj, "max_windows", None)
    if max_windows is not None:
        tokens = tokens[:max_windows]
        probe_obj = dataclasses.replace(probe_obj, max_windows=None)
    mine = dataclasses.replace(prepared, tokens=shard(tokens, rank, size, getattr(probe_obj, "micro_batch", 1)))
    local = probe_obj.measure(mine.workload, prepared.units, prepared.options)
    n = float(local.meta[probe_obj.samples_meta])
    weighted = (local.cost * n).to(torch.float64)
    rows = (local.row_cost * n).to(torch.float64) if local.row_cost is not None else None
    count = torch.tensor([n], dtype=torch.float64)
    if prepared.model is not None and next(prepared.model.parameters()).is_cuda:       # NCCL reduces on the GPU
        weighted, count = weighted.cuda(), count.cuda()
        rows = rows.cuda() if rows is not None else None
    dist.all_reduce(weighted)
    dist.all_reduce(count)
    if rows is not None:
        dist.all_reduce(rows)
    if rank != 0:
        return None
    meta = {**local.meta, probe_obj.samples_meta: int(count.item()), "ranks": size, "model": prepared.info,
            "scope": prepared.scope, "data_hash": data_hash(prepared.tokens), "n_windows": len(prepared.tokens),
            "seq_len": prepared.tokens.shape[1]}
    table = SensitivityTable(prepared.units, prepared.options, (weighted / count).cpu(), meta,
                             (rows / count).cpu() if rows is not None else None)
    if cache:
        store(table, path)
    return table
