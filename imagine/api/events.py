"""Job event streams of one ingress replica, without HTTP: one shared poll per watched job, fanned out to every stream
of that job and backing off while the job does not change (`JobWatchers`), and the bound on the streams one API key
holds open (`StreamSlots`)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass

from imagine.jobs import JobNotFound, JobRecord


def job_state(job: JobRecord) -> tuple[str, float]:
    """What a stream reports a change of: the status and the progress (to 4 places)."""
    return job.status.value, round(job.progress, 4)


@dataclass(frozen=True)
class PollPolicy:
    """How a watched job is re-read: every `interval_s` while it changes; each read that finds no change doubles the
    interval, up to `max_interval_s`."""

    interval_s: float
    max_interval_s: float

    def __post_init__(self) -> None:
        if not 0 < self.interval_s <= self.max_interval_s:
            raise ValueError(
                f"poll intervals need 0 < events_interval_s ({self.interval_s}) <= "
                f"limits.event_stream_max_poll_s ({self.max_interval_s})"
            )

    def next_interval(self, interval: float, changed: bool) -> float:
        return self.interval_s if changed else min(self.max_interval_s, interval * 2)


class _Watch:
    """One job's poller and the newest record it read, shared by the job's subscriptions (all on one event loop)."""

    def __init__(self, job: JobRecord):
        self.latest = job
        self.version = 0
        self.subscribers = 0
        self.ended = False  # the poller stopped: terminal status, job gone, or an error
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self.task: asyncio.Task | None = None

    def publish(self, job: JobRecord) -> None:
        self.latest, self.version = job, self.version + 1
        self._wake()

    def end(self, error: BaseException | None = None) -> None:
        self.ended, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()  # the next wait is for the next change


class Subscription:
    """One stream's view of a watched job."""

    def __init__(self, watch: _Watch, job: JobRecord):
        self._watch = watch
        # a poller already running may have read a newer state than `job` (the caller's own read): give it first
        self._seen = watch.version if job_state(watch.latest) == job_state(job) else watch.version - 1

    @property
    def ended(self) -> bool:
        """The poller stopped and every change it read was taken: the stream has nothing more to say."""
        return self._watch.ended and self._seen == self._watch.version

    async def next_change(self, timeout_s: float) -> JobRecord | None:
        """The job once it changed since the last call (immediately if it already did); None after `timeout_s`
        without a change or once the poller ended (`ended`). Raises the error that stopped the poller."""
        watch = self._watch
        if self._seen == watch.version and not watch.ended:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watch.changed.wait(), timeout_s)
        if watch.error is not None:
            raise watch.error
        if self._seen == watch.version:
            return None
        self._seen = watch.version
        return watch.latest


class JobWatchers:
    """One poller per watched job (per event loop), started by its first subscription and stopped after its last:
    N streams of a job cost one read per interval, not N."""

    def __init__(
        self,
        fetch: Callable[[str, str], JobRecord],
        policy: PollPolicy,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ):
        self._fetch = fetch  # (job_id, tenant) -> the job; blocking (it is run in a worker thread)
        self._policy = policy
        self._sleep = sleep
        self._watches: dict[tuple[asyncio.AbstractEventLoop, str], _Watch] = {}

    def watching(self) -> int:
        """Jobs polled now (on every event loop)."""
        return len(self._watches)

    @contextlib.asynccontextmanager
    async def subscribe(self, job: JobRecord) -> AsyncIterator[Subscription]:
        """Follow `job` (as the caller just read it) until the block exits. A job that is already terminal is not
        polled: there is nothing more to see."""
        # keyed by loop too: an asyncio.Event belongs to one loop (one per replica in Serve; several in TestClient)
        key = (asyncio.get_running_loop(), job.id)
        watch = self._watches.get(key)
        if watch is None:
            watch = _Watch(job)
            if job.status.terminal:
                watch.end()
            else:
                self._watches[key] = watch
                watch.task = asyncio.create_task(self._poll(key, watch), name=f"watch-{job.id}")
        watch.subscribers += 1
        try:
            yield Subscription(watch, job)
        finally:
            watch.subscribers -= 1
            if watch.subscribers == 0 and watch.task is not None and not watch.task.done():
                watch.task.cancel()
                self._forget(key, watch)

    async def _poll(self, key: tuple[asyncio.AbstractEventLoop, str], watch: _Watch) -> None:
        job_id, tenant = watch.latest.id, watch.latest.tenant
        interval = self._policy.interval_s
        error: BaseException | None = None
        try:
            while True:
                await self._sleep(interval)
                job = await asyncio.to_thread(self._fetch, job_id, tenant)
                changed = job_state(job) != job_state(watch.latest)
                if changed:
                    watch.publish(job)
                    if job.status.terminal:
                        return
                interval = self._policy.next_interval(interval, changed)
        except JobNotFound:
            pass  # deleted while watched: its streams end
        except Exception as e:  # noqa: BLE001 - not swallowed: every stream of the job raises it (`next_change`)
            error = e
        finally:
            self._forget(key, watch)
            watch.end(error)

    def _forget(self, key: tuple[asyncio.AbstractEventLoop, str], watch: _Watch) -> None:
        if self._watches.get(key) is watch:
            del self._watches[key]


class StreamSlots:
    """How many event streams each holder (an API key) has open; thread-safe (requests of one replica may run on
    several event loops)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, holder: Hashable) -> Callable[[], None] | None:
        """A release function for one more stream of `holder` (idempotent), or None when it holds `limit` already."""
        with self._lock:
            if self._open.get(holder, 0) >= self.limit:
                return None
            self._open[holder] = self._open.get(holder, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._open[holder] - 1
                if left:
                    self._open[holder] = left
                else:
                    del self._open[holder]

        return release

    def held(self, holder: Hashable) -> int:
        with self._lock:
            return self._open.get(holder, 0)
