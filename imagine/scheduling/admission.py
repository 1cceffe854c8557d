"""Admission and backpressure of a new job: per-key limits (in flight, queued, requested video seconds per UTC day)
and per-tier queue bounds. Pure policy over the job store's counters, read inside the transaction that inserts the
job (after its insert and the store's admission lock, so concurrent creates are counted one after the other). The
HTTP ingress answers a `Rejection` with 429 + Retry-After; a batch runner would wait `retry_after_s` instead."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from imagine.config import KeyLimits
from imagine.jobs import JobStatus, JobStore, NewJob

DAY_S = 86_400
# Retry-After of a full queue or a key at its concurrency: about one short job's time; no better estimate yet
BUSY_RETRY_AFTER_S = 10.0


@dataclass(frozen=True)
class Rejection:
    """Why a job is not admitted now: `code` names the limit; retrying after `retry_after_s` may succeed."""

    code: str
    message: str
    retry_after_s: float


def check_admission(
    store: JobStore,
    conn: sa.Connection,
    job: NewJob,
    limits: KeyLimits,
    max_queued_per_tier: Mapping[str, int],
    now: float,
) -> Rejection | None:
    """None when `job` (already inserted on `conn`, excluded from every count) may stay; else the first limit it
    breaks. Limits count the jobs of `job.api_key_id` (of `job.tenant` when auth is off)."""
    if limits.max_concurrent_jobs is not None or limits.max_queued_jobs is not None:
        active = store.count_active(conn, job.tenant, job.api_key_id, job.id)
        running, queued = active[JobStatus.RUNNING.value], active[JobStatus.QUEUED.value]
        # concurrent = in flight (queued or running): a key at its limit waits for one to finish
        if limits.max_concurrent_jobs is not None and running + queued >= limits.max_concurrent_jobs:
            return Rejection(
                "concurrency_limit",
                f"{running + queued} jobs of this key are queued or running; its limit is {limits.max_concurrent_jobs}",
                BUSY_RETRY_AFTER_S,
            )
        if limits.max_queued_jobs is not None and queued >= limits.max_queued_jobs:
            return Rejection(
                "queue_limit", f"{queued} jobs of this key are queued; its limit is {limits.max_queued_jobs}",
                BUSY_RETRY_AFTER_S,
            )
    if limits.max_video_seconds_per_day is not None:
        day_start = now - now % DAY_S  # UTC midnight (the epoch is one)
        used = store.requested_seconds_since(conn, job.tenant, job.api_key_id, day_start, job.id)
        requested = job.params.duration
        if used + requested > limits.max_video_seconds_per_day:
            return Rejection(
                "daily_video_seconds_limit",
                f"{used:g} s requested today + {requested:g} s is over this key's "
                f"{limits.max_video_seconds_per_day:g} s per UTC day",
                day_start + DAY_S - now,
            )
    bound = max_queued_per_tier.get(job.priority)
    if bound is not None and store.count_queued_in_tier(conn, job.priority, job.id) >= bound:
        return Rejection("tier_queue_full", f"the {job.priority} queue is full ({bound} jobs)", BUSY_RETRY_AFTER_S)
    return None
