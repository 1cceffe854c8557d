"""Admission and backpressure at create (per-key limits, per-tier queue bounds -> 429 + Retry-After,
store unchanged) and start deadlines (X-Start-Deadline -> expired by `JobStore.expire_overdue`). No Ray."""

from __future__ import annotations

import threading
import time

import pytest

from imagine.jobs import JobStatus


@pytest.fixture()
def env(tmp_path, db_url, make_env):
    return make_env(tmp_path, database_url=db_url)


def _assert_rejected(env, headers: dict, code: str, max_retry_after: int = 60, **body) -> None:
    before = env.snapshot()
    resp = env.create(headers, **body)
    assert resp.status_code == 429, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["param"] is None and err["type"] == "rate_limit_error"
    retry_after = resp.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= max_retry_after
    assert env.snapshot() == before


def test_concurrency_limit(env):
    headers = env.key(max_concurrent_jobs=2)
    rid = env.create(headers).json()["request_id"]
    assert env.store.claim(rid) is not None
    assert env.create(headers).status_code == 202  # one running + one queued = 2 in flight
    _assert_rejected(env, headers, "concurrency_limit")
    assert env.create(env.key()).status_code == 202  # another key of the tenant has its own limits


def test_queue_limit(env):
    headers = env.key(max_queued_jobs=2)
    ids = [env.create(headers).json()["request_id"] for _ in range(2)]
    _assert_rejected(env, headers, "queue_limit")
    env.store.claim(ids[0])  # running jobs do not count against the queue
    assert env.create(headers).status_code == 202


def test_rejected_image_upload_is_not_kept(env):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    image_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    headers = env.key(max_queued_jobs=1)
    assert env.create(headers, image_url=image_url).status_code == 202
    _assert_rejected(env, headers, "queue_limit", image_url=image_url)
    inputs = env.service.config.resolved_artifacts_dir / "inputs"
    assert len([f for f in inputs.rglob("*") if f.is_file()]) == 1  # only the admitted job's image


def test_daily_video_seconds_limit(env):
    headers = env.key(max_video_seconds_per_day=6)
    first = env.create(headers, duration=3).json()["request_id"]
    cancelled = env.create(headers, duration=3).json()["request_id"]
    seconds_to_midnight = 86_400 - int(time.time()) % 86_400
    _assert_rejected(env, headers, "daily_video_seconds_limit", max_retry_after=seconds_to_midnight + 1, duration=1)
    # failed and cancelled-before-start jobs give their seconds back
    env.store.request_cancel(cancelled)
    assert env.create(headers, duration=2).status_code == 202
    job = env.store.claim(first)
    env.store.fail(first, job.attempt, {"type": "server_error", "code": "x", "message": "boom"})
    assert env.create(headers, duration=1).status_code == 202
    assert env.create(headers, duration=3).status_code == 202  # 2 + 1 + 3 = 6
    _assert_rejected(env, headers, "daily_video_seconds_limit", max_retry_after=seconds_to_midnight + 1, duration=1)


def test_tier_queue_full(tmp_path, make_env):
    env = make_env(tmp_path, scheduling={"max_queued_per_tier": {"realtime": 5, "standard": 5, "batch": 1}})
    batch = env.key(tier="batch")
    assert env.create(batch).status_code == 202
    _assert_rejected(env, batch, "tier_queue_full")
    # the bound is per tier, over all tenants
    assert env.create(env.key("globex", tier="realtime")).status_code == 202
    _assert_rejected(env, {**env.key("globex"), "X-Priority": "batch"}, "tier_queue_full")
    env.store.close()


def test_default_limits_apply_to_keys_without_their_own_and_to_auth_off(tmp_path, make_env):
    env = make_env(tmp_path, auth={"default_limits": {"max_queued_jobs": 1}})
    own = env.key(max_queued_jobs=2)
    default = env.key()
    assert env.create(default).status_code == 202
    _assert_rejected(env, default, "queue_limit")
    assert env.create(own).status_code == 202 and env.create(own).status_code == 202
    env.store.close()

    off = make_env(tmp_path / "off", auth={"enabled": False, "default_limits": {"max_queued_jobs": 1}})
    assert off.create({}).status_code == 202
    _assert_rejected(off, {}, "queue_limit")
    off.store.close()


def test_concurrent_creates_never_exceed_the_queue_limit(env):
    headers = env.key(max_queued_jobs=5)
    n = 20
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def post() -> None:
        barrier.wait()
        codes.append(env.create(headers).status_code)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(codes) == [202] * 5 + [429] * 15
    assert len(env.store.list_by_status(JobStatus.QUEUED)) == 5


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf", ""])
def test_bad_start_deadline_is_400(env, value):
    before = env.snapshot()
    resp = env.create({**env.key(), "X-Start-Deadline": value})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "X-Start-Deadline", resp.text
    assert env.snapshot() == before


def test_start_deadline_expires_queued_jobs(env):
    headers = env.key()
    t0 = time.time()
    late = env.create({**headers, "X-Start-Deadline": "30"}).json()["request_id"]
    started = env.create({**headers, "X-Start-Deadline": "30"}).json()["request_id"]
    patient = env.create({**headers, "X-Start-Deadline": "3600"}).json()["request_id"]
    no_deadline = env.create(headers).json()["request_id"]
    deadline = env.store.get(late).deadline_at
    assert t0 + 30 <= deadline <= time.time() + 30
    assert env.client.get(f"/v1/videos/{late}", headers=headers).json()["deadline_at"] == deadline
    env.store.claim(started)

    assert env.store.expire_overdue(now=deadline - 1) == []
    assert env.store.expire_overdue(now=deadline + 1) == [late]
    assert env.store.expire_overdue(now=deadline + 1) == []  # once
    body = env.client.get(f"/v1/videos/{late}", headers=headers).json()
    assert body["status"] == "expired" and body["finished_at"] == deadline + 1
    assert body["error"]["code"] == "start_deadline_exceeded"
    assert body["usage"] == {"output_seconds": 0.0, "device_seconds": 0.0, "cost_usd": 0.0, "price_usd": 0.0}  # free
    statuses = {j: env.store.get(j).status for j in (started, patient, no_deadline)}
    assert statuses == {started: JobStatus.RUNNING, patient: JobStatus.QUEUED, no_deadline: JobStatus.QUEUED}
    assert env.store.claim(late) is None  # an expired job never runs
    conflict = env.client.post(f"/v1/videos/{late}/cancel", headers=headers)
    assert conflict.status_code == 409
