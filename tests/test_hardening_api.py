"""The HTTP API under hostile or careless clients, without Ray: body limits on the bytes received, inputs that used
to give 500s, bounded and shared event streams, and `/healthz` / `/metrics` that show no tenant's totals."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from job_helpers import generation_job

from imagine.api.errors import ApiError
from imagine.api.events import JobWatchers, PollPolicy
from imagine.api.http import BodyLimitMiddleware, body_limits, data_uri_bytes, parse_range
from imagine.api.routes import create_api
from imagine.api.service import JobService
from imagine.config import AppConfig, KeyLimits
from imagine.jobs import JobStatus, JobStore
from imagine.models.presets import get_preset
from imagine.storage import LocalArtifactStore

MIB = 1024 * 1024


class _Env:
    """The whole FastAPI app over a real SQLite store and local artifacts; edits served (tiny-vace)."""

    def __init__(self, home: Path, **config: Any):
        self.config = AppConfig.model_validate({"home": str(home), **config})
        self.store = JobStore(self.config.resolved_database_url)
        self.artifacts = LocalArtifactStore(self.config.resolved_artifacts_dir)
        self.service = JobService(
            self.config, self.store, self.artifacts, {"tiny": get_preset("tiny")}, "tiny",
            edit_presets={"tiny-vace": get_preset("tiny-vace")},
        )
        self.client = TestClient(create_api(self.service), raise_server_exceptions=False)

    def key(self, tenant: str) -> dict[str, str]:
        key, _ = self.service.keys.create(tenant, "standard", KeyLimits())
        return {"Authorization": f"Bearer {key}"}

    def queued(self, tenant: str = "default") -> str:
        return self.store.create(generation_job(tenant=tenant)).id

    def done(self, tenant: str = "default", video: bytes = b"\0" * 1000) -> str:
        job_id = self.queued(tenant)
        job = self.store.claim(job_id)
        self.artifacts.put_bytes(f"outputs/{job_id}/video.mp4", video)
        self.store.complete(job_id, job.attempt, {
            "artifact_key": f"outputs/{job_id}/video.mp4", "duration_s": 1.0, "width": 64, "height": 48,
            "num_frames": 25, "fps": 24.0, "has_audio": True,
        })
        return job_id


@pytest.fixture()
def make(tmp_path, monkeypatch) -> Iterator[Any]:
    monkeypatch.delenv("IMAGINE_METRICS_TOKEN", raising=False)  # the scrape token comes from config unless a test sets it
    made: list[_Env] = []

    def make_env(**config: Any) -> _Env:
        made.append(_Env(tmp_path / f"home{len(made)}", **config))
        return made[-1]

    yield make_env
    for env in made:
        env.store.close()


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    return resp.json()["error"]


# -- 3: body limits on the bytes actually read ---------------------------------------------------------------------
def test_chunked_body_over_the_limit_is_413_without_reading_it_all(make):
    env = make(auth={"enabled": False}, limits={"max_request_bytes": MIB})
    chunks_sent = 0

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
        nonlocal chunks_sent
        yield b'{"prompt": "'
        for _ in range(1600):  # 100 MiB if it were all read
            chunks_sent += 1
            yield b"x" * (64 * 1024)
        yield b'"}'

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=env.client.app)  # pulls the body chunk by chunk, as a server does
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/videos/generations", content=body(), headers={"Content-Type": "application/json"})

    resp = asyncio.run(post())
    err = _error(resp, 413)
    assert err["param"] == "body" and err["code"] == "request_too_large"
    assert chunks_sent <= MIB // (64 * 1024) + 1  # stopped once over the limit: ~1 MiB read, not 100
    assert env.store.count_by_status() == {}


def _call_limited(headers: list[tuple[bytes, bytes]], chunks: list[bytes], path: str = "/v1/videos/generations"):
    """(status sent, whether the app ran, chunks read) of one raw ASGI request through `BodyLimitMiddleware`."""
    ran, read, sent = [], [0], []

    async def app(scope, receive, send) -> None:
        ran.append(True)
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict:
        read[0] += 1
        i = read[0] - 1
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            sent.append(message["status"])

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers}
    asyncio.run(BodyLimitMiddleware(app, default_limit=10, route_limits={"/v1/videos/edits": 100})(scope, receive, send))
    return sent[0], bool(ran), read[0]


def test_body_limit_counts_what_is_read_whatever_content_length_says():
    assert _call_limited([(b"content-length", b"9" * 5000)], [b"x"]) == (413, False, 0)  # huge: no 500
    assert _call_limited([(b"content-length", b"11")], [b"x"]) == (413, False, 0)
    assert _call_limited([(b"content-length", b"4")], [b"xxxx"] * 10) == (413, False, 3)  # lied: stopped at 12 bytes
    assert _call_limited([], [b"xxxx"] * 10) == (413, False, 3)  # chunked
    assert _call_limited([], [b"xxxx"] * 2) == (200, True, 2)
    assert _call_limited([], [b"xxxx"] * 10, path="/v1/videos/edits") == (200, True, 10)  # the edit route's own limit
    assert _call_limited([(b"content-length", "１２".encode())], [b"x"]) == (200, True, 1)  # not ASCII digits: counted


def test_edit_route_has_room_for_a_source_of_the_configured_size():
    default, per_route = body_limits(AppConfig())
    source = AppConfig().edit.max_source_bytes
    assert default == 16 * MIB
    # a 64 MiB source and as large a mask, base64 (4/3), and the rest of the body
    assert per_route["/v1/videos/edits"] >= 2 * math.ceil(source * 4 / 3) + default
    assert data_uri_bytes(3) == 4 + 64 and data_uri_bytes(4) == 8 + 64
    _, per_route = body_limits(AppConfig(limits={"max_edit_request_bytes": 5 * MIB}))
    assert per_route["/v1/videos/edits"] == 5 * MIB


def _mp4_with_padding(pad_bytes: int) -> bytes:
    """A real 64x48 MP4 (with audio), grown by a trailing ISO BMFF `free` box that demuxers skip."""
    from imagine.pipeline.media import mux_mp4
    from imagine.pipeline.types import DecodedMedia

    frames, fps = 25, 24.0
    pixels = np.random.default_rng(0).integers(0, 255, (frames, 48, 64, 3), dtype=np.uint8)
    t = np.arange(int(16000 * frames / fps)) / 16000
    audio = np.stack([np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32) * 0.3
    buf = io.BytesIO()
    mux_mp4(DecodedMedia(pixels, audio, 16000, fps), buf)
    return buf.getvalue() + struct.pack(">I4s", pad_bytes + 8, b"free") + b"\0" * pad_bytes


def test_an_edit_past_the_old_16_mib_cap_is_accepted(make):
    env = make(auth={"enabled": False})
    source = _mp4_with_padding(13 * MIB)  # 13 MiB: as a data URI ~17.4 MiB, over the 16 MiB of other routes
    body = {"prompt": "make it glow", "video_url": "data:video/mp4;base64," + base64.b64encode(source).decode(),
            "mask": {"boxes": [[4, 4, 30, 40]]}}
    resp = env.client.post("/v1/videos/edits", json=body)
    assert resp.status_code == 202, resp.text[:500]
    job = env.store.get(resp.json()["request_id"])
    assert env.artifacts.read_bytes(job.params.source_key) == source
    # the same bytes to a route without the edit allowance are refused for size, before anything is stored
    err = _error(env.client.post("/v1/videos/generations", json={"prompt": body["video_url"]}), 413)
    assert err["param"] == "body"


# -- 5: no 500s --------------------------------------------------------------------------------------------------
def test_ranges_with_huge_numbers_are_416_or_served():
    huge = "9" * 5000  # Python refuses int() of > 4300 digits: this was a 500
    with pytest.raises(ApiError) as e:
        parse_range(f"bytes={huge}-", 100)
    assert e.value.status == 416 and e.value.param == "Range"
    assert (parse_range(f"bytes=10-{huge}", 100).start, parse_range(f"bytes=10-{huge}", 100).end) == (10, 99)
    assert (parse_range(f"bytes=-{huge}", 100).start, parse_range(f"bytes=-{huge}", 100).end) == (0, 99)
    assert (parse_range(f"bytes={'0' * 5000}5-{'0' * 5000}9", 100).start, parse_range("bytes=5-9", 100).end) == (5, 9)
    assert parse_range(f"bytes={huge}-5", 100).partial is False  # last < first: ignored


def test_content_range_with_huge_numbers_over_http(make):
    env = make(auth={"enabled": False})
    payload = bytes(range(256)) * 4
    job_id = env.done(video=payload)
    url = f"/v1/videos/{job_id}/content"
    assert _error(env.client.get(url, headers={"Range": "bytes=" + "9" * 5000 + "-"}), 416)["param"] == "Range"
    part = env.client.get(url, headers={"Range": "bytes=1000-" + "9" * 5000})
    assert part.status_code == 206 and part.content == payload[1000:]


@pytest.mark.parametrize(
    "raw,content_type",
    [(b"\xff", "application/json"), (b'\xff\xfe{"prompt": "p"}', "application/json"), (b"\x80abc", None)],
)
def test_an_undecodable_body_names_the_body(make, raw, content_type):
    env = make(auth={"enabled": False})
    headers = {"Content-Type": content_type} if content_type else {}
    err = _error(env.client.post("/v1/videos/generations", content=raw, headers=headers), 400)
    assert err["param"] == "body" and err["code"] in ("invalid_json", "invalid_body")


def test_another_tenants_video_id_is_404_naming_video_id(make):
    env = make()
    theirs = env.done(tenant="globex")
    resp = env.client.post("/v1/videos/edits", json={"prompt": "remove the dog", "video_id": theirs},
                           headers=env.key("acme"))
    err = _error(resp, 404)
    assert (err["code"], err["param"]) == ("not_found", "video_id")
    assert _error(env.client.get(f"/v1/videos/{theirs}", headers=env.key("acme")), 404)["param"] == "id"


# -- 6: event streams --------------------------------------------------------------------------------------------
def _first_event(lines: Iterator[str]) -> str:
    """The first event's data lines. Keep `lines` referenced: a line iterator garbage-collected closes its stream."""
    data = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line)
        elif not line and data:
            return "\n".join(data)
    raise AssertionError("the stream ended before its first event")


def test_event_streams_are_bounded_per_key_not_per_server(make):
    env = make(limits={"max_event_streams_per_key": 2})
    acme, globex = env.key("acme"), env.key("globex")
    acme_job, globex_job = env.queued("acme"), env.queued("globex")
    url = f"/v1/videos/{acme_job}/events"
    with env.client.stream("GET", url, headers=acme) as one, env.client.stream("GET", url, headers=acme) as two:
        assert one.status_code == two.status_code == 200
        lines = [one.iter_lines(), two.iter_lines()]
        for stream_lines in lines:
            _first_event(stream_lines)
        third = env.client.get(url, headers=acme)
        err = _error(third, 429)
        assert err["code"] == "too_many_event_streams" and err["type"] == "rate_limit_error"
        assert int(third.headers["retry-after"]) >= 1
        with env.client.stream("GET", f"/v1/videos/{globex_job}/events", headers=globex) as other:
            assert other.status_code == 200  # another tenant's key is not affected
            other_lines = other.iter_lines()
            assert acme_job not in _first_event(other_lines)
    # closed streams give their slots back
    env.service.cancel(acme_job, "acme")
    with env.client.stream("GET", url, headers=acme) as again:
        assert again.status_code == 200 and '"status":"cancelled"' in "".join(again.iter_text())


def test_an_idle_stream_ends_and_a_stream_lives_at_most_event_stream_max_s(make):
    env = make(auth={"enabled": False}, limits={"event_stream_idle_s": 0.3})
    job_id = env.queued()
    started = time.monotonic()
    with env.client.stream("GET", f"/v1/videos/{job_id}/events", params={"timeout": 60}) as resp:
        text = "".join(resp.iter_text())
    assert time.monotonic() - started < 30  # ended by idleness, not by `timeout`
    assert text.count("event: status") == 1 and '"status":"pending"' in text and '"state":"queued"' in text

    env = make(auth={"enabled": False}, limits={"event_stream_max_s": 0.3})
    job_id, progress = env.queued(), 0.0
    job = env.store.claim(job_id)
    started = time.monotonic()
    with env.client.stream("GET", f"/v1/videos/{job_id}/events", params={"timeout": 3600}) as resp:
        for line in resp.iter_lines():  # keeps changing, so never idle: the lifetime cap ends it
            if line.startswith("data:"):
                progress = min(0.99, progress + 0.01)
                env.store.report_progress(job_id, job.attempt, progress)
    assert time.monotonic() - started < 30


def test_two_streams_of_one_job_share_one_poll(tmp_path):
    config = AppConfig(home=tmp_path, auth={"enabled": False}, events_interval_s=0.01,
                       limits={"event_stream_max_poll_s": 0.02})
    store = JobStore(config.resolved_database_url)
    service = JobService(config, store, LocalArtifactStore(config.resolved_artifacts_dir), {"tiny": get_preset("tiny")}, "tiny")
    job = store.claim(store.create(generation_job()).id)
    real_get, armed, reads = store.get, [False], []

    def counting_get(job_id: str, tenant: str | None = None):
        record = real_get(job_id, tenant)
        if armed[0]:
            reads.append(record.status)
            if len(reads) == 3:  # the job fails after the third read: the next one sees it
                store.fail(job.id, job.attempt, {"type": "server_error", "code": "x", "message": "boom"})
        return record

    store.get = counting_get  # before the app is built: its watchers hold this function
    try:
        with TestClient(create_api(service)) as client:  # one event loop for both streams, as in one replica
            url = f"/v1/videos/{job.id}/events"
            with client.stream("GET", url) as one, client.stream("GET", url) as two:
                lines = [one.iter_lines(), two.iter_lines()]
                for stream_lines in lines:
                    _first_event(stream_lines)
                armed[0] = True
                texts = ["\n".join(stream_lines) for stream_lines in lines]
    finally:
        store.close()
    assert all('"status":"failed"' in t for t in texts)
    # one poller: three reads of the running job, one that saw it failed (two pollers would read at least 5)
    assert reads == [JobStatus.RUNNING] * 3 + [JobStatus.FAILED]


def test_the_shared_poll_backs_off_while_nothing_changes_and_stops_with_its_last_stream():
    intervals: list[float] = []
    state = {"progress": 0.0, "reads": 0}
    template = None

    def fetch(job_id: str, tenant: str):
        state["reads"] += 1
        return _record(template, state["progress"])

    async def sleep(seconds: float) -> None:
        intervals.append(seconds)
        if len(intervals) == 6:
            state["progress"] = 0.5  # a change: back to the fast interval
        await asyncio.sleep(0)

    async def main() -> None:
        watchers = JobWatchers(fetch, PollPolicy(0.1, 1.0), sleep=sleep)
        async with watchers.subscribe(_record(template, 0.0)) as updates:
            changed = await updates.next_change(timeout_s=30)
            assert changed is not None and changed.progress == 0.5
            while len(intervals) < 9:
                await asyncio.sleep(0)
            assert watchers.watching() == 1
        await asyncio.sleep(0)
        assert watchers.watching() == 0  # the last subscriber left: no more reads

    template = _template()
    asyncio.run(main())
    assert intervals[:9] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 0.1, 0.2, 0.4]
    with pytest.raises(ValueError, match="event_stream_max_poll_s"):
        PollPolicy(1.0, 0.5)


def _template():
    from imagine.jobs.store import JobRecord  # a record without a database

    return JobRecord(
        id="j1", tenant="t", kind="generation", model="tiny", priority="standard", status=JobStatus.RUNNING,
        params=generation_job().params, progress=0.0, cancel_requested=False, attempt=1, preempt_requested=False,
        preemptions=0, checkpoint_key=None, error=None, result=None, created_at=0.0, started_at=0.0,
        finished_at=None, updated_at=0.0,
    )


def _record(template, progress: float):
    import dataclasses

    return dataclasses.replace(template, progress=progress)


# -- 9: /healthz and /metrics ------------------------------------------------------------------------------------
def test_healthz_says_only_that_it_is_up(make):
    env = make()
    env.queued("acme")
    assert env.client.get("/healthz").json() == {"status": "ok"}


TOKEN = "scrape-token-0123456789"


@pytest.mark.parametrize(
    "config,authorization,status",
    [
        ({}, None, 404),  # auth on, no token: off
        ({"metrics": {"token": TOKEN}}, None, 401),
        ({"metrics": {"token": TOKEN}}, f"Bearer {TOKEN}x", 401),
        ({"metrics": {"token": TOKEN}}, f"Basic {TOKEN}", 401),
        ({"metrics": {"token": TOKEN}}, f"Bearer {TOKEN}", 200),
        ({"auth": {"enabled": False}}, None, 200),  # local development: open
        ({"auth": {"enabled": False}, "metrics": {"token": TOKEN}}, None, 401),  # a token is always asked for
        ({"auth": {"enabled": False}, "metrics": {"enabled": False}}, None, 404),
        ({"metrics": {"enabled": False, "token": TOKEN}}, f"Bearer {TOKEN}", 404),
    ],
)
def test_metrics_access(make, config, authorization, status):
    env = make(**config)
    headers = {"Authorization": authorization} if authorization else {}
    resp = env.client.get("/metrics", headers=headers)
    assert resp.status_code == status, resp.text
    if status == 200:
        assert "imagine_queue_depth" in resp.text
    else:
        err = resp.json()["error"]
        assert err["code"] == {401: "invalid_metrics_token", 404: "metrics_disabled"}[status]
    # an API key is not a scrape token
    if config.get("auth", {}).get("enabled", True):
        assert env.client.get("/metrics", headers=env.key("acme")).status_code in (401, 404)


def test_metrics_token_is_secret_and_not_short(make, monkeypatch):
    config = AppConfig(metrics={"token": TOKEN})
    assert TOKEN not in repr(config) and config.metrics.token.get_secret_value() == TOKEN
    with pytest.raises(ValueError, match="metrics.token"):
        AppConfig(metrics={"token": "short"})
    # or from the environment of each replica (a Kubernetes Secret), like the database URL
    monkeypatch.setenv("IMAGINE_METRICS_TOKEN", TOKEN)
    env = make()
    assert env.client.get("/metrics").status_code == 401
    assert env.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    monkeypatch.setenv("IMAGINE_METRICS_TOKEN", "short")
    with pytest.raises(ValueError, match="IMAGINE_METRICS_TOKEN"):
        make()
