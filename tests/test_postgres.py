"""The job store's transitions on a real PostgreSQL (the session server from conftest): the same
contracts test_jobs.py checks on SQLite, incl. exclusive claims under concurrent claimers."""

from __future__ import annotations

import threading

import pytest

from imagine.jobs import JobStateConflict, JobStatus, JobStore, NewJob, StepSignal
from imagine.jobs.store import make_engine


@pytest.fixture()
def store(postgresql_url):
    s = JobStore(postgresql_url)
    yield s
    s.close()


def _new(store: JobStore, **params) -> str:
    return store.create(NewJob(kind="generation", model="tiny", params=params)).id


def test_engine_uses_psycopg3(postgresql_url):
    engine = make_engine(postgresql_url)
    try:
        assert engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW server_version").scalar().startswith("15")
    finally:
        engine.dispose()


def test_create_roundtrip(store):
    jid = _new(store, prompt="p", seed=1)
    job = store.get(jid)
    assert job.status == JobStatus.QUEUED and job.params == {"prompt": "p", "seed": 1} and job.attempt == 0
    assert job.cancel_requested is False and isinstance(job.created_at, float)
    assert store.count_by_status() == {"queued": 1}


def test_claim_is_exclusive(store):
    ids = [_new(store, i=i) for i in range(3)]
    claimed = store.claim_next()
    assert claimed.id == ids[0] and claimed.status == JobStatus.RUNNING and claimed.attempt == 1
    assert store.claim(ids[0]) is None


def test_four_concurrent_claimers_never_double_dispatch(postgresql_url):
    stores = [JobStore(postgresql_url) for _ in range(4)]
    try:
        ids = {_new(stores[0], i=i) for i in range(40)}
        got: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(len(stores))

        def worker(s: JobStore) -> None:
            barrier.wait()  # all four race for the same head of the queue
            while (job := s.claim_next()) is not None:
                with lock:
                    got.append(job.id)

        threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(got) == sorted(ids)  # each job exactly once
        assert all(stores[0].get(i).attempt == 1 for i in ids)
    finally:
        for s in stores:
            s.close()


def test_stale_attempt_cannot_finish(store):
    jid = _new(store)
    first = store.claim_next()
    assert store.requeue_running() == 1
    assert store.get(jid).status == JobStatus.QUEUED and store.get(jid).started_at is None
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
