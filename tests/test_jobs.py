"""Job store transitions and the dispatch loop, without Ray (real SQLite)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from job_helpers import generation_job, generation_params

from imagine.jobs import JobStateConflict, JobStatus, JobStore, StepSignal
from imagine.scheduling.dispatcher import Dispatcher


@pytest.fixture()
def store(db_url):
    """The same store, dispatcher and preemption tests on SQLite and on a real PostgreSQL."""
    s = JobStore(db_url)
    yield s
    s.close()


def _new(store: JobStore, **params) -> str:
    return store.create(generation_job(params=params)).id


def test_wal_mode_and_roundtrip(store):
    if store.url.startswith("sqlite"):
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    jid = _new(store, prompt="a fox", seed=7)
    job = store.get(jid)
    assert job.status == JobStatus.QUEUED and job.params == generation_params(prompt="a fox", seed=7) and job.attempt == 0


def test_claim_is_fifo_and_exclusive(store):
    ids = [_new(store, seed=i) for i in range(3)]
    claimed = store.claim_next()
    assert claimed.id == ids[0] and claimed.status == JobStatus.RUNNING and claimed.attempt == 1
    assert store.claim(ids[0]) is None  # already running


def test_concurrent_claims_never_double_dispatch(db_url):
    stores = [JobStore(db_url) for _ in range(4)]
    ids = {_new(stores[0], seed=i) for i in range(20)}
    got: list[str] = []
    lock = threading.Lock()

    def worker(s: JobStore) -> None:
        while (job := s.claim_next()) is not None:
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == sorted(ids)  # each job exactly once


def test_stale_attempt_cannot_finish(store):
    jid = _new(store)
    first = store.claim_next()
    assert store.requeue_running() == 1
    second = store.claim_next()
    assert second.attempt == first.attempt + 1
    assert store.complete(jid, first.attempt, {"x": 1}) is False
    assert store.complete(jid, second.attempt, {"x": 2}) is True
    assert store.get(jid).result == {"x": 2} and store.get(jid).progress == 1.0


def test_cancel_paths(store):
    queued = _new(store)
    assert store.request_cancel(queued).status == JobStatus.CANCELLED
    running = _new(store)
    job = store.claim_next()
    assert store.report_progress(running, job.attempt, 0.3) == StepSignal.CONTINUE
    assert store.request_cancel(running).cancel_requested is True
    assert store.report_progress(running, job.attempt, 0.4) == StepSignal.CANCEL
    # a restart while the cancel is pending ends the job cancelled instead of re-running it
    assert store.requeue_running() == 0 and store.get(running).status == JobStatus.CANCELLED
    with pytest.raises(JobStateConflict):
        store.request_cancel(running)


def test_running_cancel_then_mark_cancelled(store):
    jid = _new(store)
    job = store.claim_next()
    store.request_cancel(jid)
    assert store.mark_cancelled(jid, job.attempt) is True
    assert store.get(jid).status == JobStatus.CANCELLED and store.get(jid).finished_at is not None


def test_fail_records_error(store):
    jid = _new(store)
    job = store.claim_next()
    assert store.fail(jid, job.attempt, {"type": "server_error", "code": "x", "message": "boom"})
    rec = store.get(jid)
    assert rec.status == JobStatus.FAILED and rec.error["message"] == "boom" and rec.finished_at


def test_dispatcher_respects_capacity_and_drains(store):
    ids = [_new(store, seed=i) for i in range(5)]

    async def scenario() -> list[int]:
        concurrent, peak, go = 0, [], asyncio.Event()

        async def run_job(job, release_slot):
            nonlocal concurrent
            concurrent += 1
            peak.append(concurrent)
            await go.wait()
            concurrent -= 1
            store.complete(job.id, job.attempt, {})

        d = Dispatcher(store, run_job, capacity=2, poll_interval_s=0.05)
        loop_task = asyncio.create_task(d.run_forever())
        for _ in range(1000):  # bounded: 10 s
            if concurrent == 2:  # both jobs are inside run_job (not just scheduled as tasks)
                break
            await asyncio.sleep(0.01)
        assert concurrent == 2 and len(d.running_ids) == 2
        assert store.count_by_status()["queued"] == 3  # no over-claiming
        go.set()
        for _ in range(2000):
            if store.count_by_status().get("done") == 5:
                break
            await asyncio.sleep(0.01)
        await d.stop()
        loop_task.cancel()
        return peak

    peak = asyncio.run(scenario())
    assert max(peak) == 2
    assert all(store.get(i).status == JobStatus.DONE for i in ids)


def test_dispatcher_recover_requeues_running(store):
    jid = _new(store)
    store.claim_next()
    d = Dispatcher(store, run_job=lambda job, release: asyncio.sleep(0), capacity=1)
    assert d.recover() == 1 and store.get(jid).status == JobStatus.QUEUED


def test_released_slot_starts_the_next_job_while_the_first_finishes(store):
    """A job gives its denoiser slot back when sampling ends; its decode overlaps the next job."""
    first, second = _new(store, seed=0), _new(store, seed=1)

    async def scenario() -> None:
        released, second_started, finish_first = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def run_job(job, release):
            if job.id == first:
                release()  # "denoise done"; still "decoding" until finish_first
                released.set()
                await finish_first.wait()
            else:
                second_started.set()
            store.complete(job.id, job.attempt, {})

        d = Dispatcher(store, run_job, capacity=1, poll_interval_s=0.05)
        loop_task = asyncio.create_task(d.run_forever())
        await asyncio.wait_for(released.wait(), 5)
        await asyncio.wait_for(second_started.wait(), 5)  # started although `first` is not finished
        assert store.get(first).status == JobStatus.RUNNING
        finish_first.set()
        for _ in range(2000):
            if store.count_by_status().get("done") == 2:
                break
            await asyncio.sleep(0.01)
        await d.stop()
        loop_task.cancel()

    asyncio.run(scenario())
    assert store.get(first).status == JobStatus.DONE and store.get(second).status == JobStatus.DONE


def test_higher_tier_preempts_lowest_running_job_bounded(store):
    """Both slots run batch work; a realtime job arrives: the most recently started batch job is asked
    to pause, re-queues with its checkpoint, the realtime job runs, the paused one resumes. A job
    already paused `max_preemptions` times is never asked again."""
    b1 = store.create(generation_job(priority="batch")).id
    b2 = store.create(generation_job(priority="batch")).id
    claims: list[tuple[str, str | None]] = []

    async def scenario() -> None:
        finish_batch = asyncio.Event()

        async def run_job(job, release):
            claims.append((job.id, job.checkpoint_key))
            if job.priority == "realtime":
                store.complete(job.id, job.attempt, {})
                return
            while True:  # a "denoiser": one step per tick, obeying the step signal
                signal = store.report_progress(job.id, job.attempt, 0.5)
                if signal == StepSignal.PREEMPT:
                    release()
                    store.requeue_preempted(job.id, job.attempt, f"ck-{job.id}")
                    return
                if finish_batch.is_set():
                    store.complete(job.id, job.attempt, {})
                    return
                await asyncio.sleep(0.01)

        d = Dispatcher(store, run_job, capacity=2, poll_interval_s=0.02, preemption=True, max_preemptions=1)
        loop_task = asyncio.create_task(d.run_forever())

        async def until(pred, what):
            for _ in range(2000):
                if pred():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"timed out: {what}")

        await until(lambda: d.busy_slots == 2, "both batch jobs running")
        r1 = store.create(generation_job(priority="realtime")).id
        d.nudge()
        await until(lambda: store.get(r1).status == JobStatus.DONE, "realtime job done")
        paused = [j for j in (b1, b2) if store.get(j).preemptions == 1]
        assert paused == [b2]  # the most recently started of the lowest tier
        await until(lambda: (b2, f"ck-{b2}") in claims, "paused job resumed from its checkpoint")
        # b2 has used its one preemption: the next realtime job pauses b1 instead
        r2 = store.create(generation_job(priority="realtime")).id
        d.nudge()
        await until(lambda: store.get(r2).status == JobStatus.DONE, "second realtime job done")
        assert store.get(b1).preemptions == 1 and store.get(b2).preemptions == 1
        finish_batch.set()
        await until(lambda: all(store.get(j).status == JobStatus.DONE for j in (b1, b2)), "batch jobs done")
        await d.stop()
        loop_task.cancel()

    asyncio.run(scenario())


def test_no_preemption_when_disabled_or_not_outranked(store):
    ids = [store.create(generation_job(priority="standard")).id for _ in range(2)]

    async def scenario() -> None:
        go = asyncio.Event()

        async def run_job(job, release):
            await go.wait()
            store.complete(job.id, job.attempt, {})

        d = Dispatcher(store, run_job, capacity=1, poll_interval_s=0.02, preemption=True)
        loop_task = asyncio.create_task(d.run_forever())
        for _ in range(100):
            await asyncio.sleep(0.01)
        # a same-tier job waits: nobody is asked to pause
        assert store.get(ids[0]).preempt_requested is False and store.get(ids[1]).status == JobStatus.QUEUED
        go.set()
        await d.stop()
        loop_task.cancel()

    asyncio.run(scenario())


def test_retry_requeues_until_max_attempts(store):
    jid = _new(store)
    job = store.claim(jid)
    assert store.retry(jid, job.attempt, max_attempts=2)
    rec = store.get(jid)
    assert rec.status == JobStatus.QUEUED and rec.started_at is None
    job = store.claim(jid)
    assert job.attempt == 2
    assert not store.retry(jid, job.attempt, max_attempts=2)  # out of attempts: the caller fails it
    assert store.get(jid).status == JobStatus.RUNNING
    assert not store.retry(jid, 1, max_attempts=5)  # a stale attempt changes nothing


def test_dispatcher_pools_wait_for_capacity_without_blocking_others(store):
    """A job for a pool with no slots (its parallel replica cannot be placed yet) stays queued, and the
    same tenant's job for another pool still runs; when the pool gets a slot, the job starts."""
    big = store.create(generation_job(pool="sp4")).id
    small = store.create(generation_job()).id

    async def scenario() -> None:
        started: list[str] = []

        async def run_job(job, release_slot):
            started.append(job.id)
            store.complete(job.id, job.attempt, {})

        d = Dispatcher(store, run_job, capacity={"denoiser": 1, "sp4": 0}, poll_interval_s=0.02)
        loop_task = asyncio.create_task(d.run_forever())
        for _ in range(500):
            if small in started:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert started == [small]
        assert store.get(big).status == JobStatus.QUEUED and store.get(big).pool == "sp4"
        d.set_capacity(1, pool="sp4")
        for _ in range(500):
            if big in started:
                break
            await asyncio.sleep(0.01)
        await d.stop()
        loop_task.cancel()
        assert started == [small, big]

    asyncio.run(scenario())
    assert store.get(big).status == JobStatus.DONE
