"""Retention: the sweeper that deletes what an ended job no longer needs.

- Inputs, checkpoints and work files (`storage.keys.scratch_keys`) of every ended job (done, failed, cancelled,
  expired), however it ended: a queued job cancelled while paused by preemption, or one whose start deadline
  passed, is ended by the API or the dispatcher, never by a sampling loop, so the sweep looks in the store for ended
  jobs not swept yet rather than relying on whoever ended them.
- Outputs of done jobs past `expires_at` (set at completion from `retention.outputs_ttl_s`); the API already answers
  410 for them from that moment, the sweep deletes the files. The job rows stay.

Every step is idempotent: deleting an absent key is a no-op and a job is marked swept with a conditional UPDATE, so
any number of sweepers (every scheduler replica, a cron job) may run at once; a crash between delete and mark only
repeats the deletes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from imagine.jobs.store import JobRecord, JobStore
from imagine.storage.base import ArtifactStore
from imagine.storage.keys import scratch_keys

logger = logging.getLogger(__name__)


def output_keys(job: JobRecord) -> list[str]:
    """The stored outputs of a done job (its video, and any other artifact its result names)."""
    result = job.result or {}
    keys = [result["artifact_key"]] if result.get("artifact_key") else []
    keys += [k for k in (result.get("artifact_keys") or {}).values() if k]
    return keys


@dataclass
class SweepCounts:
    inputs: int = 0  # jobs whose inputs and work files were deleted
    outputs: int = 0  # jobs whose outputs were deleted

    def __add__(self, other: SweepCounts) -> SweepCounts:
        return SweepCounts(self.inputs + other.inputs, self.outputs + other.outputs)


class Sweeper:
    def __init__(self, store: JobStore, artifacts: ArtifactStore, batch: int = 500):
        self.store = store
        self.artifacts = artifacts
        self.batch = batch

    def sweep_job(self, job_id: str) -> bool:
        """Delete one ended job's inputs and work files now (the scheduler calls this as a job ends)."""
        jobs = self.store.ended_unswept(1, job_id)
        return bool(jobs) and self._sweep_inputs(jobs, time.time()) == 1

    def sweep_outputs(self, job_id: str) -> bool:
        """Delete one done job's outputs now if they are past retention (a deleted job's are at once)."""
        now = time.time()
        jobs = self.store.outputs_past_retention(now, 1, job_id)
        return bool(jobs) and self._sweep_outputs(jobs, now) == 1

    def _sweep_inputs(self, jobs: list[JobRecord], now: float) -> int:
        keys = [k for job in jobs for k in scratch_keys(job.tenant, job.id)]
        keys += [job.checkpoint_key for job in jobs if job.checkpoint_key]
        self.artifacts.delete_many(sorted(set(keys)))
        return self.store.mark_inputs_purged([job.id for job in jobs], now)

    def _sweep_outputs(self, jobs: list[JobRecord], now: float) -> int:
        self.artifacts.delete_many(sorted({k for job in jobs for k in output_keys(job)}))
        return self.store.mark_outputs_purged([job.id for job in jobs], now)

    def sweep(self, now: float | None = None, max_batches: int = 20) -> SweepCounts:
        """One pass: up to `max_batches` batches of each kind (a large backlog continues on the next pass)."""
        now = time.time() if now is None else now
        counts = SweepCounts()
        for _ in range(max_batches):
            jobs = self.store.ended_unswept(self.batch)
            if not jobs:
                break
            counts.inputs += self._sweep_inputs(jobs, now)
            if len(jobs) < self.batch:
                break
        for _ in range(max_batches):
            jobs = self.store.outputs_past_retention(now, self.batch)
            if not jobs:
                break
            counts.outputs += self._sweep_outputs(jobs, now)
            if len(jobs) < self.batch:
                break
        if counts.inputs or counts.outputs:
            logger.info("retention: deleted the inputs of %d ended jobs, the outputs of %d expired ones",
                        counts.inputs, counts.outputs)
        return counts
