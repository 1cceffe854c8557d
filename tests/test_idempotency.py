"""Idempotency-Key on `POST /v1/videos/generations` (Stripe / IETF draft semantics), auth on, no Ray."""

from __future__ import annotations

import json
import threading

import pytest

from imagine.jobs.idempotency import body_fingerprint


@pytest.fixture()
def env(tmp_path, db_url, make_env):
    return make_env(tmp_path, database_url=db_url)


def _job_rows(env) -> int:
    with env.store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT COUNT(*) FROM jobs").scalar_one()


def test_same_key_same_body_replays_the_job(env):
    headers = {**env.key(), "Idempotency-Key": "order-1"}
    first = env.create(headers, duration=2, seed=3)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    # the same body, written differently (key order, whitespace, 2 vs 2.0): the same canonical JSON
    raw = '{ "seed": 3,  "duration": 2.0, "prompt": "p" }'
    again = env.client.post("/v1/videos/generations", content=raw, headers={**headers, "Content-Type": "application/json"})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["request_id"] == first.json()["request_id"]
    assert _job_rows(env) == 1


def test_same_key_different_body_is_422(env):
    headers = {**env.key(), "Idempotency-Key": "order-1"}
    assert env.create(headers, duration=2).status_code == 202
    before = env.snapshot()
    resp = env.create(headers, duration=3)
    assert resp.status_code == 422
    assert resp.json()["error"]["param"] == "Idempotency-Key" and resp.json()["error"]["code"] == "idempotency_key_reused"
    assert env.snapshot() == before


def test_keys_are_per_tenant(env):
    a = env.create({**env.key("acme"), "Idempotency-Key": "k"}).json()["request_id"]
    b = env.create({**env.key("globex"), "Idempotency-Key": "k"}).json()["request_id"]
    assert a != b and _job_rows(env) == 2
    # two keys of one tenant share its idempotency keys
    replay = env.create({**env.key("acme"), "Idempotency-Key": "k"})
    assert replay.json()["request_id"] == a and replay.headers["idempotent-replayed"] == "true"


def test_expired_key_can_be_reused(env):
    headers = {**env.key(), "Idempotency-Key": "k"}
    first = env.create(headers).json()["request_id"]
    with env.store.engine.begin() as conn:  # age the record past the TTL
        conn.exec_driver_sql("UPDATE idempotency_keys SET expires_at = created_at - 1")
    second = env.create(headers, duration=3)  # a new body is fine once the key is forgotten
    assert second.status_code == 202 and "idempotent-replayed" not in second.headers
    assert second.json()["request_id"] != first and _job_rows(env) == 2
    assert env.create(headers, duration=3).json()["request_id"] == second.json()["request_id"]
    assert env.service.idempotency.ttl_s == env.service.config.auth.idempotency_ttl_s


def test_invalid_key_is_400(env):
    before = env.snapshot()
    resp = env.create({**env.key(), "Idempotency-Key": "x" * 256})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "Idempotency-Key"
    assert env.snapshot() == before


def test_rejected_request_does_not_keep_its_key(tmp_path, make_env):
    env = make_env(tmp_path)
    headers = {**env.key(max_queued_jobs=1), "Idempotency-Key": "k"}
    first = env.create(headers).json()["request_id"]
    rejected = env.create({**headers, "Idempotency-Key": "k2"})
    assert rejected.status_code == 429
    env.store.request_cancel(first)  # frees the queue slot
    retried = env.create({**headers, "Idempotency-Key": "k2"})
    assert retried.status_code == 202 and "idempotent-replayed" not in retried.headers
    env.store.close()


def test_50_concurrent_duplicates_make_one_job(env):
    headers = {**env.key(), "Idempotency-Key": "burst"}
    n = 50
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def post(i: int) -> None:
        barrier.wait()
        results[i] = env.create(headers, duration=2, seed=11)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None and r.status_code == 202 for r in results), [r and r.text for r in results]
    assert len({r.json()["request_id"] for r in results}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in results) == 1  # exactly one original
    assert _job_rows(env) == 1
    with env.store.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM idempotency_keys").scalar_one() == 1


def test_concurrent_different_bodies_one_wins(env):
    headers = {**env.key(), "Idempotency-Key": "race"}
    n = 20
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def post(i: int) -> None:
        barrier.wait()
        results[i] = env.create(headers, seed=i)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in results)
    assert codes == [202] + [422] * (n - 1) and _job_rows(env) == 1


def test_body_fingerprint_is_canonical():
    assert body_fingerprint({"a": 1, "b": [1, 2]}) == body_fingerprint(json.loads('{"b":[1,2],"a":1}'))
    assert body_fingerprint({"a": 1}) != body_fingerprint({"a": 2})
