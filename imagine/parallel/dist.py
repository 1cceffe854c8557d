"""Process groups for parallel denoising: init through DeepSpeed's comm layer (NCCL on CUDA, gloo on CPU), and a
small launcher that runs a function on N local ranks (tests, benchmarks). No model code here."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import traceback
from typing import Any, Callable

import torch


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the rendezvous port of a new group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend(device: str | torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    backend: str = "gloo",
    timeout_s: float = 120.0,
    local_rank: int | None = None,
) -> None:
    """Join the default torch.distributed group through `deepspeed.init_distributed`.

    Sets the env DeepSpeed reads (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_SIZE`, `MASTER_*`). `LOCAL_SIZE`
    must be the group size: DeepSpeed's CPU shm all-reduce segfaults otherwise (FINDINGS). A bounded `timeout_s`
    turns a dead peer into an error instead of a hang.
    """
    import deepspeed

    local_rank = rank if local_rank is None else local_rank
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
        LOCAL_SIZE=str(world_size),
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
    )
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        distributed_port=master_port,
        verbose=False,
        timeout=datetime.timedelta(seconds=timeout_s),
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
    )
    _unlink_shm_segment(rank, master_addr, master_port)


def shm_segment_path(rank: int, master_addr: str, master_port: int) -> str:
    """Where DeepSpeed's CPU shm all-reduce keeps `rank`'s workspace (`ops/csrc/cpu/comm/shm.cpp`)."""
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"


def _unlink_shm_segment(rank: int, master_addr: str, master_port: int) -> None:
    """DeepSpeed's CPU comm maps one ~67 MB POSIX shm segment per rank and never unlinks it, so every group
    ever started leaks RAM into /dev/shm, dead or alive (hundreds of groups filled a 24 GiB machine and Ray's
    OOM killer took the Serve controller). Once every rank has returned from init (the barrier), all peers have
    mapped every segment; the name can go: mappings outlive the name, and nothing is left when ranks exit or
    are killed."""
    from deepspeed.comm import comm  # the module: `deepspeed.comm.cdb` is a stale import-time None

    if getattr(comm.cdb, "shm_comm_op", None) is None:  # CUDA and other accelerators: no shm all-reduce
        return
    torch.distributed.barrier()
    try:
        os.unlink(shm_segment_path(rank, master_addr, master_port))
    except FileNotFoundError:
        pass


def destroy_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _rank_main(fn, rank, world_size, port, args, results, torch_threads, device) -> None:
    try:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        local_rank = None
        if torch.device(device).type == "cuda":  # every rank on the one device: DeepSpeed binds cuda:LOCAL_RANK
            index = torch.device(device).index or 0
            torch.cuda.set_device(index)
            local_rank = index
        init_distributed(rank, world_size, "127.0.0.1", port, backend="gloo", local_rank=local_rank)
        try:
            out = fn(rank, world_size, *args)
        finally:
            destroy_distributed()
        results.put((rank, True, out))
    except BaseException:  # report every failure to the parent, which raises it
        results.put((rank, False, traceback.format_exc()))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 300.0,
    torch_threads: int = 1,
    device: str = "cpu",
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined in one gloo group; return the
    per-rank results (picklable) in rank order. Raises RuntimeError with the rank's traceback if any rank fails,
    or TimeoutError after `timeout_s`. `fn` must be importable (module level).

    `device="cuda[:i]"` puts EVERY rank on that one GPU (current device and `LOCAL_RANK` = i), still over gloo with
    CUDA tensors: NCCL refuses two ranks on one GPU, and this is how sequence / tensor parallel is checked for
    correctness on a one-GPU machine (not for speed: gloo stages CUDA tensors through the host)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main, args=(fn, r, world_size, port, args, results, torch_threads, device), daemon=True
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while len(out) < world_size:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(out))} did not finish in {timeout_s}s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} exited with code {[procs[r].exitcode for r in dead]}")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world_size)]
