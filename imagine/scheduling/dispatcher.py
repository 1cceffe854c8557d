"""The dispatch loop: claims queued jobs from the store and runs them, never more at once than the
denoisers can start now. Pure asyncio, no Ray: the Serve scheduler deployment hosts it and supplies
`run_job` (which calls the stage deployments). The claim order lives in `JobStore.claim_next`;
the priority/fair-share issue swaps that policy in without changing this loop.

A job holds a denoiser *slot* from its claim until `release()` (called by `run_job` once the sampling
loop is over), so the next job starts denoising while the previous one is still being decoded."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from imagine.jobs import JobRecord, JobStore

logger = logging.getLogger(__name__)

RunJob = Callable[[JobRecord, Callable[[], None]], Awaitable[None]]


class Dispatcher:
    def __init__(self, store: JobStore, run_job: RunJob, capacity: int, poll_interval_s: float = 0.5):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.store = store
        self.run_job = run_job
        self.capacity = capacity
        self.poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._slots: set[str] = set()  # job ids holding a denoiser slot
        self._stopped = False

    @property
    def running_ids(self) -> list[str]:
        """Jobs dispatched and not finished (denoising or decoding)."""
        return list(self._tasks)

    @property
    def busy_slots(self) -> int:
        return len(self._slots)

    def nudge(self) -> None:
        """Something changed (a job was queued, a slot freed): look at the queue now."""
        self._wake.set()

    def recover(self) -> int:
        """Start-up: jobs a dead scheduler left running go back to the queue."""
        n = self.store.requeue_running()
        if n:
            logger.info("re-queued %d job(s) left running by a previous scheduler", n)
        return n

    async def _claim(self) -> JobRecord | None:
        return await asyncio.to_thread(self.store.claim_next)

    async def fill_slots(self) -> int:
        """Claim and start jobs while slots are free; returns how many started."""
        started = 0
        while len(self._slots) < self.capacity and not self._stopped:
            job = await self._claim()
            if job is None:
                break
            self._slots.add(job.id)
            self._tasks[job.id] = asyncio.create_task(self._run(job), name=f"job-{job.id}")
            started += 1
        return started

    def _release(self, job_id: str) -> None:
        if job_id in self._slots:
            self._slots.discard(job_id)
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
