"""Durable state: the job store (and, later, idempotency keys and the usage ledger)."""

from imagine.jobs.store import (
    JobNotFound,
    JobRecord,
    JobStateConflict,
    JobStatus,
    JobStore,
    NewJob,
)

__all__ = ["JobNotFound", "JobRecord", "JobStateConflict", "JobStatus", "JobStore", "NewJob"]
