"""The denoiser's queue-depth autoscaling policy, on a fake Serve context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from imagine.serving.autoscaling import desired_replicas, queue_depth_policy


def test_desired_replicas_covers_queue_plus_running_within_bounds():
    assert desired_replicas(0, 0, 1, lo=1, hi=4) == 1
    assert desired_replicas(3, 1, 1, lo=1, hi=8) == 4
    assert desired_replicas(3, 1, 2, lo=1, hi=8) == 2
    assert desired_replicas(100, 2, 1, lo=1, hi=4) == 4
    with pytest.raises(ValueError, match="jobs_per_replica"):
        desired_replicas(1, 0, 0, lo=1, hi=2)


def _ctx(queued: list[float], denoising: list[float], target: int = 1):
    return SimpleNamespace(
        aggregated_metrics={
            "queued_jobs": {f"r{i}": q for i, q in enumerate(queued)},
            "denoising": {f"r{i}": d for i, d in enumerate(denoising)},
        },
        config=SimpleNamespace(target_ongoing_requests=1.0),
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=3,
        target_num_replicas=target,
        current_time=0.0,
        policy_state={},
    )


def test_policy_scales_on_store_queue_not_request_counts():
    # every replica reports the same store-wide queue: it is counted once (max), not per replica
    assert queue_depth_policy(_ctx([2, 2], [1, 1], target=2))[0] == 3  # 2 queued + 2 denoising, capped at 3
    assert queue_depth_policy(_ctx([0], [1]))[0] == 1
    assert queue_depth_policy(_ctx([0, 0], [0, 0], target=3))[0] == 1  # idle: back to min
    empty = _ctx([], [])
    empty.aggregated_metrics = None
    assert queue_depth_policy(empty)[0] == 1
