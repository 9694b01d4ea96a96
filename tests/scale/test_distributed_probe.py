"""Probes under torchrun: 2 gloo processes on the CPU give the 1-process table; ranks that disagree stop."""
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bitalloc.models.distributed import check_agreement, shard
from bitalloc.errors import BitallocError


def _costs(path):
    return [(r["unit"], r["bits"], float(r["cost"])) for r in csv.DictReader(open(path))]


def test_torchrun_two_ranks_equal_one_process(tiny_llama_dir, calib_file, tmp_path):
    env = {**os.environ, "BITALLOC_CACHE": str(tmp_path / "cache1"), "OMP_NUM_THREADS": "1"}
    common = ["probe", "--model", str(tiny_llama_dir), "--calib", str(calib_file), "--n-windows", "5",
              "--seq-len", "64", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "bitalloc", *common, "--out", str(tmp_path / "one.csv")],
                         env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bitalloc", *common, "--out", str(tmp_path / "two.csv")],
                         env={**env, "BITALLOC_CACHE": str(tmp_path / "cache2")}, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert "2 ranks" in two.stdout
    a, b = _costs(tmp_path / "one.csv"), _costs(tmp_path / "two.csv")
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) == 14 * 4
    assert max(abs(x[2] - y[2]) / x[2] for x, y in zip(a, b)) <= 1e-6
    # the per-row costs (for --granularity row) are all-reduced too; each rank-0 cache holds them
    from bitalloc.sensitivity.table import SensitivityTable
    t1, t2 = (SensitivityTable.load(next((tmp_path / c / "tables").glob("*.safetensors"))) for c in ("cache1", "cache2"))
    assert t1.row_cost is not None and t1.row_cost.shape == t2.row_cost.shape
    assert torch.allclose(t1.row_cost, t2.row_cost, rtol=1e-6, atol=1e-15)


def test_shard_keeps_micro_batches_whole():
    tokens = torch.arange(7)[:, None].repeat(1, 3)
    assert shard(tokens, 0, 2, micro_batch=2)[:, 0].tolist() == [0, 1, 4, 5]
    assert shard(tokens, 1, 2, micro_batch=2)[:, 0].tolist() == [2, 3, 6]
    with pytest.raises(BitallocError, match="1 calibration micro-batch.*2 ranks"):
        shard(tokens[:1], 0, 2)


def _disagree(rank, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_agreement({"model hash": "same", "calibration data": f"data-{rank}"})
        results[rank] = "no error"
    except BitallocError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_on_the_data_stop_with_one_line(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_disagree, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        assert "ranks disagree on the calibration data" in results[rank]
