"""Who runs next: strict priority tiers with aging, weighted fair share between tenants inside a tier.
Pure logic over plain values and an injectable clock (no database, no Ray), so it is unit-tested with
a fake clock; the dispatcher feeds it the queue heads from the job store.

* Tiers `realtime > standard > batch` are strict: a job of a higher *effective* tier always goes first.
* Aging: a queued job is promoted one tier for every `aging_s` seconds it has waited (batch -> standard
  -> realtime), so nothing starves however much higher-tier work keeps arriving.
* Fair share inside a tier: each tenant has a weight (default 1); job starts are shared in proportion
  to the weights (start-time fair queuing on start counts; ties: the older job). Within a tenant,
  FIFO. The counters are rebuilt from recently started jobs when the scheduler restarts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

from imagine.config import TIERS


def tier_rank(tier: str) -> int:
    """0 for the highest tier."""
    try:
        return TIERS.index(tier)
    except ValueError as e:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}") from e


@dataclass(frozen=True)
class QueuedJob:
    id: str
    tenant: str
    tier: str
    created_at: float
    pool: str = "denoiser"


class FairSharePolicy:
    """Start-time fair queuing per tier: a tenant's tag advances by 1/weight per started job; the lowest
    tag goes next. A tenant that was idle re-enters at the tier's virtual time, so it cannot bank
    credit while away and then monopolise the tier."""

    def __init__(self, aging_s: float, tenant_weights: dict[str, float] | None = None):
        if aging_s <= 0:
            raise ValueError(f"aging_s must be > 0, got {aging_s}")
        for tenant, weight in (tenant_weights or {}).items():
            if weight <= 0:
                raise ValueError(f"tenant_weights[{tenant!r}] must be > 0, got {weight}")
        self.aging_s = aging_s
        self.weights = dict(tenant_weights or {})
        self._tags: dict[str, dict[str, float]] = defaultdict(dict)  # tier -> tenant -> finish tag
        self._vtime: dict[str, float] = defaultdict(float)  # tier -> start tag of the last started job

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def effective_rank(self, job: QueuedJob, now: float) -> int:
        waited = max(0.0, now - job.created_at)
        return max(0, tier_rank(job.tier) - int(waited // self.aging_s))

    def _start_tag(self, tenant: str, tier: str) -> float:
        return max(self._tags[tier].get(tenant, 0.0), self._vtime[tier])

    def observe_start(self, tenant: str, tier: str) -> None:
        start = self._start_tag(tenant, tier)
        self._tags[tier][tenant] = start + 1.0 / self.weight(tenant)
        self._vtime[tier] = start

    def rebuild(self, started: Iterable[tuple[str, str]]) -> None:
        """Reset the counters from (tenant, tier) of recently started jobs, oldest first."""
        self._tags.clear()
        self._vtime.clear()
        for tenant, tier in started:
            self.observe_start(tenant, tier)

    def pick(self, queued: Iterable[QueuedJob], now: float) -> QueuedJob | None:
        """The job to start next, or None when nothing is queued."""
        best_rank: int | None = None
        heads: dict[str, QueuedJob] = {}  # per tenant: its oldest job of the best effective tier
        for job in queued:
            rank = self.effective_rank(job, now)
            if best_rank is None or rank < best_rank:
                best_rank, heads = rank, {}
            if rank == best_rank:
                head = heads.get(job.tenant)
                if head is None or (job.created_at, job.id) < (head.created_at, head.id):
                    heads[job.tenant] = job
        if not heads:
            return None
        tenant = min(heads, key=lambda t: (self._start_tag(t, heads[t].tier), heads[t].created_at, heads[t].id))
        return heads[tenant]
