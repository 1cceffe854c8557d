"""Denoiser-pool autoscaling on real demand, down to zero replicas and back.

The scheduler dispatches only as many jobs as a pool can start now, so Serve's own request counts never see the
queue. Instead this policy (run by the Serve controller, one instance per pool) reads the pool's queue depth from the
job store itself, so it sees demand even when the pool has no replica to report it, and adds the jobs the pool's
replicas say they are denoising: it sizes the pool to `ceil((queued + denoising) / jobs_per_replica)` within min/max
(min may be 0: an idle pool goes back to zero). Serve applies the configured up/down delays.

The store is read on a background thread, at most every `refresh_s`: the policy runs inside the controller's
control loop and must never block it (a database that is slow or down only makes the queue figure stale)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from typing import Any

from ray.serve.config import AutoscalingContext

POLICY_PATH = "imagine.serving.autoscaling:QueueDepthPolicy"
logger = logging.getLogger("ray.serve")


def desired_replicas(queued: float, denoising: float, jobs_per_replica: float, lo: int, hi: int) -> int:
    """Replicas needed to start every queued job now, clamped to [lo, hi]."""
    if jobs_per_replica <= 0:
        raise ValueError(f"jobs_per_replica must be > 0, got {jobs_per_replica}")
    want = math.ceil((max(0.0, queued) + max(0.0, denoising)) / jobs_per_replica)
    return max(lo, min(hi, want))


class QueueDepthPolicy:
    """Serve custom autoscaling policy of one denoiser pool (`policy_kwargs` are JSON: a URL and names only).

    `database_url`: the job store, or None to resolve it as the replicas do (`$IMAGINE_DATABASE_URL`, else the SQLite
    file `sqlite_default`), so a password given to the pods by a Secret never enters the Serve config."""

    def __init__(self, pool: str, database_url: str | None = None, sqlite_default: str | None = None,
                 refresh_s: float = 1.0):
        from imagine.config import DATABASE_URL_ENV

        self.pool = pool
        self.url = database_url or os.environ.get(DATABASE_URL_ENV) or sqlite_default
        self.refresh_s = refresh_s
        self.queued = 0.0
        self.read_at = -math.inf  # monotonic time of the last finished read
        self._store: Any = None
        self._reading = threading.Lock()
        self._last_error_log = -math.inf

    def refresh(self) -> None:
        """Read the pool's queue depth now (on the caller's thread)."""
        if not self._reading.acquire(blocking=False):
            return  # a read is already in flight
        try:
            if self._store is None:
                from imagine.jobs import JobStore

                # the controller only reads the queue: it never migrates (the replicas and `imagine db upgrade` do)
                self._store = JobStore(self.url, migrate=False)
            self.queued = float(sum(self._store.queue_depth(self.pool).values()))
            self.read_at = time.monotonic()
        except Exception as e:  # noqa: BLE001 - a store outage must not kill the controller's loop: keep the last value
            now = time.monotonic()
            if now - self._last_error_log > 60:
                self._last_error_log = now
                logger.warning("imagine autoscaling of pool %r: cannot read the job store (%s); keeping %s queued",
                               self.pool, e, self.queued)
            self.read_at = now  # back off for refresh_s before the next try
        finally:
            self._reading.release()

    def _refresh_soon(self) -> None:
        if time.monotonic() - self.read_at >= self.refresh_s and not self._reading.locked():
            threading.Thread(target=self.refresh, name=f"imagine-queue-{self.pool}", daemon=True).start()

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        self._refresh_soon()
        metrics = ctx.aggregated_metrics or {}
        denoising = sum(metrics.get("denoising", {}).values())
        per_replica = float(getattr(ctx.config, "target_ongoing_requests", 1) or 1)
        want = desired_replicas(
            self.queued, denoising, per_replica, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        )
        # Serve applies upscale_delay_s / downscale_delay_s to a custom policy's decisions itself
        # (it keeps its own decision counters in the policy state): answer the wanted size every time.
        return want, {}
