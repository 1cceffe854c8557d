"""The dispatch loop: claims queued jobs from the store in policy order and runs them, never more at
once than the denoisers can start now. Pure asyncio, no Ray: the Serve scheduler deployment hosts it
and supplies `run_job` (which calls the stage deployments).

A job holds a denoiser *slot* from its claim until `release()` (called by `run_job` once the sampling
loop is over or was paused), so the next job starts denoising while the previous one is decoded.
When every slot runs lower-tier work and a higher-tier job waits, one running job is asked to pause
at its next step boundary (`JobStore.request_preempt`); it checkpoints, re-queues and resumes later.

Slots come in *pools*, one per deployment a job may need (`denoiser`, a parallel variant such as `sp4`,
`editor`); a job's pool is fixed when it is created (`JobRecord.pool`). A pool whose replicas are not up
(or cannot be placed) has no slots, so its jobs stay queued -- never failed -- until capacity appears, and
they do not block other pools' jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from imagine.jobs import JobRecord, JobStore
from imagine.scheduling.policy import FairSharePolicy, QueuedJob, tier_rank

logger = logging.getLogger(__name__)

RunJob = Callable[[JobRecord, Callable[[], None]], Awaitable[None]]
# fair-share counters are rebuilt from the starts of this window when the scheduler restarts
FAIRNESS_MEMORY_S = 3600.0


DEFAULT_POOL = "denoiser"


@dataclass
class _Slot:
    job_id: str
    tier: str
    started: float
    pool: str = DEFAULT_POOL
    preempting: bool = False


class Dispatcher:
    def __init__(
        self,
        store: JobStore,
        run_job: RunJob,
        capacity: int | dict[str, int],
        poll_interval_s: float = 0.5,
        policy: FairSharePolicy | None = None,
        preemption: bool = False,
        max_preemptions: int = 2,
        clock: Callable[[], float] = time.time,
        paused: bool = False,
    ):
        capacities = capacity if isinstance(capacity, dict) else {DEFAULT_POOL: capacity}
        for pool, n in capacities.items():
            if n < 0:
                raise ValueError(f"capacity[{pool!r}] must be >= 0, got {n}")
        self.store = store
        self.run_job = run_job
        self.capacities: dict[str, int] = dict(capacities)
        self.poll_interval_s = poll_interval_s
        self.policy = policy or FairSharePolicy(aging_s=300.0)
        self.preemption = preemption
        self.max_preemptions = max_preemptions
        self.clock = clock
        self.paused = paused
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots: dict[str, _Slot] = {}  # job id -> slot it holds while denoising
        self._stopped = False

    @property
    def running_ids(self) -> list[str]:
        """Jobs dispatched and not finished (denoising or decoding)."""
        return list(self._tasks)

    @property
    def capacity(self) -> int:
        """Slots over all pools."""
        return sum(self.capacities.values())

    @property
    def busy_slots(self) -> int:
        return len(self._slots)

    def busy(self, pool: str) -> int:
        return sum(1 for s in self._slots.values() if s.pool == pool)

    def free(self, pool: str, pending: int = 0) -> int:
        return self.capacities.get(pool, 0) - self.busy(pool) - pending

    def set_capacity(self, capacity: int, pool: str = DEFAULT_POOL) -> None:
        """A pool's replicas came or went: dispatch against its new number of slots (0: its jobs wait)."""
        capacity = max(0, capacity)
        if capacity != self.capacities.get(pool):
            logger.info("dispatch capacity of pool %s: %s -> %d", pool, self.capacities.get(pool), capacity)
            self.capacities[pool] = capacity
            self._wake.set()

    def nudge(self) -> None:
        """Something changed (a job was queued, a slot freed): look at the queue now."""
        self._wake.set()

    def recover(self) -> int:
        """Start-up: jobs a dead scheduler left running go back to the queue; fair share is rebuilt."""
        n = self.store.requeue_running()
        if n:
            logger.info("re-queued %d job(s) left running by a previous scheduler", n)
        self.policy.rebuild(self.store.recent_starts(self.clock() - FAIRNESS_MEMORY_S))
        return n

    def _queue(self) -> list[QueuedJob]:
        return [
            QueuedJob(id=i, tenant=t, tier=p, created_at=c, pool=pool) for i, t, p, c, pool in self.store.queue_heads()
        ]

    def _claim_best(self, pending: dict[str, int]) -> JobRecord | None:
        """Claim the policy's choice among jobs whose pool has a free slot; a lost race (cancelled or claimed
        meanwhile) just tries again."""
        for _ in range(8):
            startable = [q for q in self._queue() if self.free(q.pool, pending.get(q.pool, 0)) > 0]
            choice = self.policy.pick(startable, self.clock())
            if choice is None:
                return None
            job = self.store.claim(choice.id)
            if job is not None:
                self.policy.observe_start(job.tenant, job.priority)
                return job
        return None

    def _maybe_preempt(self) -> str | None:
        """A pool's slots all busy: if the best job waiting for it outranks its lowest running one, ask that one
        to pause (a job waiting for a pool with no slots at all preempts nothing: it waits for capacity)."""
        if not self.preemption:
            return None
        if any(s.preempting for s in self._slots.values()):
            return None  # one pause at a time: the freed slot goes to the waiting job first
        full = [
            q for q in self._queue()
            if self.capacities.get(q.pool, 0) > 0 and self.free(q.pool) <= 0
        ]
        waiting = self.policy.pick(full, self.clock())
        if waiting is None:
            return None
        waiting_rank = self.policy.effective_rank(waiting, self.clock())
        victims = sorted(
            (s for s in self._slots.values() if s.pool == waiting.pool and tier_rank(s.tier) > waiting_rank),
            key=lambda s: (-tier_rank(s.tier), -s.started),  # lowest tier, then the most recently started
        )
        for slot in victims:
            if self.store.request_preempt(slot.job_id, self.max_preemptions):
                slot.preempting = True
                logger.info("asked job %s (%s) to pause for %s (%s)", slot.job_id, slot.tier, waiting.id, waiting.tier)
                return slot.job_id
        return None

    def _fill(self) -> list[JobRecord]:
        """One synchronous pass (runs in a worker thread): expire, claim while slots are free, preempt."""
        self.store.expire_overdue(self.clock())
        claimed: list[JobRecord] = []
        pending: dict[str, int] = {}  # claimed in this pass, slots not taken yet
        while not self._stopped and not self.paused:
            job = self._claim_best(pending)
            if job is None:
                break
            claimed.append(job)
            pending[job.pool] = pending.get(job.pool, 0) + 1
        if not claimed:
            self._maybe_preempt()
        return claimed

    async def fill_slots(self) -> int:
        """Claim and start jobs while slots are free; returns how many started."""
        claimed = await asyncio.to_thread(self._fill)
        for job in claimed:
            self._slots[job.id] = _Slot(job.id, job.priority, self.clock(), job.pool)
            self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        return len(claimed)

    def _release(self, job_id: str) -> None:
        if self._slots.pop(job_id, None) is not None:
            self._wake.set()

    async def _run(self, job: JobRecord) -> None:
        try:
            await self.run_job(job, lambda: self._release(job.id))
        except Exception:  # run_job records failures itself; this is the last line of defence
            logger.exception("job %s: unhandled error in run_job", job.id)
        finally:
            self._release(job.id)
            self._tasks.pop(job.id, None)

    async def run_forever(self) -> None:
        while not self._stopped:
            try:
                await self.fill_slots()
            except Exception:  # a database hiccup must not kill the loop; retry after the interval
                logger.exception("dispatch pass failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
