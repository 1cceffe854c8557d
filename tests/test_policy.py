"""Scheduling policy with a fake clock: strict tiers, aging, weighted fair share, no starvation."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from imagine.scheduling.policy import FairSharePolicy, QueuedJob

_ids = itertools.count()


def job(tenant: str = "a", tier: str = "standard", t: float = 0.0) -> QueuedJob:
    return QueuedJob(id=f"j{next(_ids):06d}", tenant=tenant, tier=tier, created_at=t)


def drain(policy: FairSharePolicy, queue: list[QueuedJob], n: int, now: float) -> list[QueuedJob]:
    out = []
    for _ in range(n):
        chosen = policy.pick(queue, now)
        if chosen is None:
            break
        queue.remove(chosen)
        policy.observe_start(chosen.tenant, chosen.tier)
        out.append(chosen)
    return out


def test_strict_tiers_then_fifo():
    policy = FairSharePolicy(aging_s=1000)
    queue = [job(tier="batch", t=0), job(tier="standard", t=1), job(tier="realtime", t=2), job(tier="standard", t=3)]
    order = [j.tier for j in drain(policy, queue, 4, now=5)]
    assert order == ["realtime", "standard", "standard", "batch"]


def test_empty_queue_and_bad_input():
    assert FairSharePolicy(aging_s=10).pick([], now=0) is None
    with pytest.raises(ValueError, match="aging_s"):
        FairSharePolicy(aging_s=0)
    with pytest.raises(ValueError, match="tenant_weights"):
        FairSharePolicy(aging_s=1, tenant_weights={"x": 0})
    with pytest.raises(ValueError, match="tier"):
        FairSharePolicy(aging_s=1).pick([job(tier="vip")], now=0)


def test_aging_promotes_one_tier_per_period():
    policy = FairSharePolicy(aging_s=60)
    old_batch = job(tier="batch", t=0)
    assert policy.effective_rank(old_batch, now=59) == 2
    assert policy.effective_rank(old_batch, now=60) == 1
    assert policy.effective_rank(old_batch, now=125) == 0
    fresh_standard = job(tier="standard", t=100)
    assert policy.pick([fresh_standard, old_batch], now=61) == old_batch  # both standard now: the older one
    fresh_realtime = job(tier="realtime", t=100)
    assert policy.pick([fresh_realtime, old_batch], now=119) == fresh_realtime
    assert policy.pick([fresh_realtime, old_batch], now=120) == old_batch  # promoted twice: realtime, and older


def test_no_starvation_under_endless_higher_tier_load():
    policy = FairSharePolicy(aging_s=30)
    starving = job(tenant="b", tier="batch", t=0)
    queue = [starving]
    now = 0.0
    for step in range(1000):  # a fresh realtime job arrives every second, one job starts per second
        queue.append(job(tenant="a", tier="realtime", t=now))
        chosen = policy.pick(queue, now)
        queue.remove(chosen)
        policy.observe_start(chosen.tenant, chosen.tier)
        if chosen is starving:
            break
        now += 1.0
    assert starving not in queue
    assert now <= 2 * 30 + 1  # promoted to realtime after two aging periods, then oldest realtime


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 3.0}, {"a": 2.0, "b": 1.0, "c": 5.0}])
def test_fair_share_within_10_percent_of_weights(weights):
    policy = FairSharePolicy(aging_s=10_000, tenant_weights=weights)
    queue = [job(tenant=t, tier="batch", t=i * 0.001) for t in weights for i in range(2000)]
    started = drain(policy, queue, 600, now=1.0)
    counts = Counter(j.tenant for j in started)
    total_w = sum(weights.values())
    for tenant, w in weights.items():
        expected = 600 * w / total_w
        assert abs(counts[tenant] - expected) <= 0.1 * expected, (tenant, counts, expected)


def test_idle_tenant_cannot_bank_credit():
    policy = FairSharePolicy(aging_s=10_000)
    queue = [job(tenant="a", t=i) for i in range(500)]
    drain(policy, queue, 300, now=1000)  # only tenant a was active
    queue += [job(tenant="b", t=1000 + i) for i in range(500)]
    counts = Counter(j.tenant for j in drain(policy, queue, 100, now=2000))
    assert 40 <= counts["b"] <= 60  # b shares from now on; it does not get 300 starts in a row


def test_rebuild_restores_shares():
    policy = FairSharePolicy(aging_s=10_000)
    policy.rebuild([("a", "standard")] * 5)
    queue = [job(tenant="a", t=0), job(tenant="b", t=1)]
    assert policy.pick(queue, now=2).tenant == "b"
