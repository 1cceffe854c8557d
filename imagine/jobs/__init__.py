"""Durable state: the job store with its typed job params (and idempotency keys and the usage ledger beside it)."""

from imagine.jobs.params import (
    EditInstruction,
    EditMask,
    EditParams,
    EditPlace,
    GenerationParams,
    JobKind,
    JobParams,
    params_for,
)
from imagine.jobs.store import (
    JobNotFound,
    JobRecord,
    JobStateConflict,
    JobStatus,
    JobStore,
    NewJob,
    StepSignal,
    new_job_id,
)

__all__ = [
    "EditInstruction",
    "EditMask",
    "EditParams",
    "EditPlace",
    "GenerationParams",
    "JobKind",
    "JobNotFound",
    "JobParams",
    "JobRecord",
    "JobStateConflict",
    "JobStatus",
    "JobStore",
    "NewJob",
    "StepSignal",
    "new_job_id",
    "params_for",
]
