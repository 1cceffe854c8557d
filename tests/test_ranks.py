"""RankGroup on a local Ray: 2 gloo ranks compute together and rank 0 answers; a rank that raises or dies
mid-collective fails the call fast with RankFailure naming it; restart() brings a working group back; shutdown
returns every resource."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import ray
import torch
import torch.distributed as dist
from serve_helpers import wait_until

from imagine.serving.ranks import PlacementTimeout, RankFailure, RankGroup, rank_bundles

pytestmark = pytest.mark.ray


class Summer:
    """A rank object that talks to its peers: every method that matters runs a collective."""

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, values: torch.Tensor) -> tuple[int, list[float]]:
        out = values * (self.rank + 1)  # rank-dependent input: the sum proves both ranks took part
        dist.all_reduce(out)
        return self.rank, out.tolist()

    def backend(self) -> str:
        return dist.get_backend()

    def fail_on(self, bad_rank: int) -> int:
        if self.rank == bad_rank:
            raise ValueError(f"rank {self.rank} refuses")
        dist.barrier()  # the healthy rank blocks here, waiting for the one that raised
        return self.rank

    def die_on(self, bad_rank: int) -> int:
        if self.rank == bad_rank:
            os._exit(1)
        dist.all_reduce(torch.ones(1))  # blocks until the peer joins, which it never will
        return self.rank

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.rank


def summer(rank: int, world_size: int) -> Summer:
    return Summer(rank, world_size)


def broken_factory(rank: int, world_size: int) -> Summer:
    if rank == 1:
        raise RuntimeError("no weights for rank 1")
    return Summer(rank, world_size)


@pytest.fixture(scope="module")
def local_ray(ray_session) -> Iterator[None]:
    """The session's Ray (its workers import this module by name: the rank objects are defined here)."""
    yield


def group(**overrides: object) -> RankGroup:
    options: dict = {"cpus_per_rank": 0.5, "collective_timeout_s": 120.0, "setup_timeout_s": 180.0}
    options.update(overrides)
    return RankGroup(2, summer, "cpu", **options)


def test_rank_bundles_shape_and_validation() -> None:
    assert rank_bundles(2, "cuda", 1, 0.5, True) == [{"CPU": 0.5}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    assert rank_bundles(1, "cpu", 2, 1, False) == [{"CPU": 1.0}, {"CPU": 2.0}]
    with pytest.raises(ValueError, match="declare_gpus"):
        rank_bundles(2, "cuda", 1, 1, False)
    with pytest.raises(ValueError, match="replica_cpus"):
        rank_bundles(2, "cpu", 1, 0, False)
    with pytest.raises(ValueError, match="world_size"):
        rank_bundles(0, "cpu", 1, 1, False)
    with pytest.raises(ValueError, match="some resource"):
        rank_bundles(2, "cpu", 0, 1, False)
    with pytest.raises(ValueError, match="device"):
        rank_bundles(2, "tpu", 1, 1, False)  # type: ignore[arg-type]


def test_all_reduce_across_ranks_and_rank0_answers(local_ray: None) -> None:
    initial = ray.available_resources().get("CPU")
    with group() as g:
        assert g.healthy
        info = g.info
        assert [i.rank for i in info] == [0, 1] and len({i.pid for i in info}) == 2
        assert len(set(g.node_ids())) == 1
        # rank r sends [1, 2] * (r + 1): the sum over 2 ranks is [1, 2] * 3
        assert g.call("all_reduce", torch.tensor([1.0, 2.0])) == (0, [3.0, 6.0])
        assert g.call_all("all_reduce", torch.tensor([1.0, 2.0])) == [(0, [3.0, 6.0]), (1, [3.0, 6.0])]
        assert g.call("backend") == "gloo"
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(initial - 1.0)
    assert not g.healthy
    # the group's own placement group is removed and its resources come back
    wait_until(lambda: ray.available_resources().get("CPU") == initial, 30, "CPU back to initial")
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "CREATED" not in states and "PENDING" not in states, states


def test_health_check_answers_during_a_long_call(local_ray: None) -> None:
    with group() as g:
        done = threading.Event()
        worker = threading.Thread(target=lambda: (g.call("sleep", 3.0), done.set()))
        worker.start()
        started = time.monotonic()
        g.check_health(timeout_s=2.0)  # control concurrency group: not queued behind the 3 s call
        assert time.monotonic() - started < 2.5 and not done.is_set()
        worker.join(timeout=30)
        assert done.is_set()


def test_rank_that_raises_fails_the_call_fast(local_ray: None) -> None:
    with group() as g:
        started = time.monotonic()
        with pytest.raises(RankFailure, match=r"rank 1 raised.*ValueError: rank 1 refuses") as err:
            g.call("fail_on", 1)
        assert time.monotonic() - started < 15  # not the 120 s collective timeout
        assert err.value.rank == 1 and isinstance(err.value.cause, ValueError)
        assert not g.healthy
        with pytest.raises(RankFailure, match="broken"):
            g.call("backend")
        g.restart()
        assert g.healthy and g.call("all_reduce", torch.tensor([1.0])) == (0, [3.0])


def test_rank_death_mid_collective_then_restart(local_ray: None) -> None:
    with group() as g:
        old_pids = {i.pid for i in g.info}
        started = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 died") as err:
            g.call("die_on", 1)
        elapsed = time.monotonic() - started
        assert elapsed < 60, elapsed
        assert err.value.rank == 1
        assert not g.healthy
        g.restart()
        assert g.healthy
        assert not old_pids & {i.pid for i in g.info}  # fresh processes
        assert g.call("all_reduce", torch.tensor([2.0])) == (0, [6.0])


def test_failing_factory_fails_start_and_call_timeout_kills_the_group(local_ray: None) -> None:
    g = RankGroup(2, broken_factory, "cpu", cpus_per_rank=0.5, collective_timeout_s=60.0, setup_timeout_s=180.0)
    try:
        with pytest.raises(RankFailure, match="setup: rank 1 raised.*no weights for rank 1"):
            g.start()
        assert not g.healthy
    finally:
        g.shutdown()
    with group() as g:
        with pytest.raises(RankFailure, match=r"did not finish within 1.0s") as err:
            g.call("sleep", 30.0, timeout_s=1.0)
        assert err.value.rank is None and not g.healthy


def test_unplaceable_group_times_out_without_leaking(local_ray: None) -> None:
    g = RankGroup(2, summer, "cpu", cpus_per_rank=3.0, placement_timeout_s=2.0)  # 6 CPUs on a 4-CPU Ray
    with pytest.raises(PlacementTimeout, match="could not place 2 ranks"):
        g.start()
    assert g.placement_group is None
    states = [pg["state"] for pg in ray.util.placement_group_table().values()]
    assert "PENDING" not in states and "CREATED" not in states, states
    g.shutdown()


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, exited but not yet reaped by the raylet, holds no memory: not running)."""
    import psutil

    try:
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_restart_and_shutdown_wait_for_the_killed_ranks_to_exit(local_ray: None) -> None:
    """`ray.kill` returns at once; restart() and shutdown() return only once the killed ranks' processes are gone
    (so a new group finds their device memory free), also for ranks a failed call killed earlier. Checked right
    after each returns: without the wait the old processes are still exiting then."""
    g = group()
    try:
        g.start()
        first = {i.pid for i in g.info}
        g.restart()
        assert not [pid for pid in first if _running(pid)]
        second = {i.pid for i in g.info}
        assert len(second) == 2 and not second & first  # fresh processes
        with pytest.raises(RankFailure):
            g.call("fail_on", 1)  # the failed call kills the ranks and forgets their info; their pids are kept
        g.restart()
        assert not [pid for pid in second if _running(pid)]
        third = {i.pid for i in g.info}
        assert len(third) == 2 and not third & (first | second)
        with pytest.raises(RankFailure):
            g.call("fail_on", 0)
    finally:
        g.shutdown()
    assert not [pid for pid in third if _running(pid)]
