"""The denoiser's queue-depth autoscaling policy, on a fake Serve context."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from job_helpers import generation_job

from imagine.jobs import JobStore
from imagine.serving.autoscaling import QueueDepthPolicy, desired_replicas


def test_desired_replicas_covers_queue_plus_running_within_bounds():
    assert desired_replicas(0, 0, 1, lo=1, hi=4) == 1
    assert desired_replicas(3, 1, 1, lo=1, hi=8) == 4
    assert desired_replicas(3, 1, 2, lo=1, hi=8) == 2
    assert desired_replicas(100, 2, 1, lo=1, hi=4) == 4
    with pytest.raises(ValueError, match="jobs_per_replica"):
        desired_replicas(1, 0, 0, lo=1, hi=2)


def _ctx(denoising: list[float], lo: int = 1, hi: int = 3, target: int = 1):
    return SimpleNamespace(
        aggregated_metrics={"denoising": {f"r{i}": d for i, d in enumerate(denoising)}},
        config=SimpleNamespace(target_ongoing_requests=1.0),
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        target_num_replicas=target,
        current_time=0.0,
        policy_state={},
    )


def _policy(tmp_path, pool: str = "denoiser") -> tuple[QueueDepthPolicy, JobStore]:
    url = f"sqlite:///{tmp_path / 'imagine.db'}"
    return QueueDepthPolicy(pool, database_url=url, refresh_s=0.05), JobStore(url)


def _settle(policy: QueueDepthPolicy, ctx, expected: int) -> int:
    """Call the policy (as the controller's loop does) until its background read shows `expected` (bounded)."""
    deadline = time.monotonic() + 10
    while (got := policy(ctx)[0]) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_policy_reads_the_pools_queue_from_the_store_and_scales_from_and_to_zero(tmp_path):
    policy, store = _policy(tmp_path)
    assert policy(_ctx([], lo=0))[0] == 0  # nothing queued: a pool at zero stays there
    jobs = [store.create(generation_job()) for _ in range(2)]
    store.create(generation_job(pool="sp4"))  # another pool's demand is not this pool's
    assert _settle(policy, _ctx([], lo=0), 2) == 2  # zero replicas report nothing, yet the queue is seen
    assert store.claim(jobs[0].id) is not None
    assert _settle(policy, _ctx([1.0], lo=0), 2) == 2  # 1 queued + 1 denoising
    assert _settle(policy, _ctx([1.0, 0.0], lo=0, hi=1), 1) == 1  # capped at max
    store.request_cancel(jobs[1].id)  # queued: cancelled at once
    assert _settle(policy, _ctx([0.0], lo=0), 0) == 0  # idle: back to zero
    assert _settle(policy, _ctx([0.0], lo=1), 1) == 1  # ... or to min


def test_policy_never_blocks_on_a_broken_store(tmp_path, caplog):
    """The controller's loop calls the policy every tick: a store that cannot be read keeps the last queue figure."""
    policy = QueueDepthPolicy("denoiser", database_url=f"sqlite:///{tmp_path / 'missing' / 'x' / 'imagine.db'}")
    (tmp_path / "missing").write_text("a file where the database's folder should be")
    started = time.monotonic()
    assert policy(_ctx([2.0], lo=0))[0] == 2
    assert time.monotonic() - started < 0.5
    policy.refresh()
    assert policy.queued == 0.0 and policy(_ctx([], lo=0))[0] == 0


def test_policy_resolves_the_database_url_in_the_controller(monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGINE_DATABASE_URL", "postgresql://imagine@db/imagine")
    assert QueueDepthPolicy("denoiser", None, "sqlite:///x.db").url == "postgresql://imagine@db/imagine"
    monkeypatch.delenv("IMAGINE_DATABASE_URL")
    assert QueueDepthPolicy("denoiser", None, "sqlite:///x.db").url == "sqlite:///x.db"


