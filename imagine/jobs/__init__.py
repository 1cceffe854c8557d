"""Durable state: the job store (and idempotency keys and the usage ledger beside it)."""

from imagine.jobs.store import JobNotFound, JobRecord, JobStateConflict, JobStatus, JobStore, NewJob, StepSignal

__all__ = ["JobNotFound", "JobRecord", "JobStateConflict", "JobStatus", "JobStore", "NewJob", "StepSignal"]
