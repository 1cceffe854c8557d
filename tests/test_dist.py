"""DeepSpeed comm groups on CPU: the shm all-reduce keeps working while nothing of a group is left in /dev/shm
(DeepSpeed never unlinks its ~67 MB per-rank segments; leaked ones filled this machine's RAM)."""

from __future__ import annotations

import glob
import os

import torch

from imagine.parallel.dist import run_ranks, shm_segment_path


def _all_reduce_rank(rank: int, world_size: int) -> dict:
    from deepspeed.comm import comm

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    sums = []
    for n in (1000, 2**21):  # below and above the kernel's 1 MiB naive threshold (two code paths)
        t = torch.full((n,), float(rank + 1))
        comm.inference_all_reduce(t)
        sums.append((float(t.min()), float(t.max())))
    return {
        "shm_op": comm.cdb.shm_comm_op is not None,
        "kernel_level": getattr(comm.cdb, "shm_vector_kernel_level", 0),
        "own_segment_left": os.path.exists(shm_segment_path(rank, addr, port)),
        "port": port,
        "sums": sums,
    }


def test_shm_all_reduce_works_and_leaves_no_segment():
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    out = run_ranks(_all_reduce_rank, 2, timeout_s=180)
    expected = float(1 + 2)
    for r in out:
        assert r["sums"] == [(expected, expected)] * 2, r
        assert not r["own_segment_left"], r
    assert out[0]["shm_op"], "DeepSpeed's CPU shm all-reduce was not built: this test would not cover it"
    left = set(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{out[0]['port']}_*")) - before
    assert not left, left
