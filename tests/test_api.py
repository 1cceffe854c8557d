"""The HTTP API without Ray: real FastAPI app, real SQLite job store, real local artifact store.
Bad input must give a 4xx JSON error naming the parameter and must not change any stored job."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagine.api.errors import ApiError
from imagine.api.http import parse_range
from imagine.api.routes import create_api
from imagine.api.service import JobService
from imagine.config import AppConfig
from imagine.jobs import JobStatus, JobStore
from imagine.models.presets import get_preset
from imagine.storage import LocalArtifactStore


@pytest.fixture()
def env(tmp_path):
    config = AppConfig(home=tmp_path, auth={"enabled": False})  # auth: tests/test_auth.py
    store = JobStore(config.resolved_database_url)
    artifacts = LocalArtifactStore(config.resolved_artifacts_dir)
    nudges: list[int] = []
    service = JobService(config, store, artifacts, {"tiny": get_preset("tiny")}, "tiny", notify=lambda: nudges.append(1))
    client = TestClient(create_api(service), raise_server_exceptions=False)
    yield client, store, artifacts, nudges
    store.close()


def _png_data_uri(w: int = 40, h: int = 30) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _snapshot(store: JobStore) -> list:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM jobs ORDER BY id")]


def test_create_resolves_and_stores_the_request(env):
    client, store, _, nudges = env
    resp = client.post("/v1/videos/generations", json={"prompt": "a fox", "duration": 2, "seed": 7})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["request_id"]
    assert nudges == [1]
    job = client.get(f"/v1/videos/{job_id}").json()
    assert job["status"] == "pending" and job["state"] == "queued" and job["progress"] == 0 and job["priority"] == "standard"
    req = job["request"]
    assert (req["width"], req["height"], req["num_frames"], req["fps"]) == (864, 480, 49, 24.0)
    assert req["seed"] == 7 and req["has_image"] is False
    assert job["video"] is None and job["created_at"] > 0


def test_seed_is_chosen_and_reported_when_omitted(env):
    client, *_ = env
    ids = [client.post("/v1/videos/generations", json={"prompt": "x"}).json()["request_id"] for _ in range(2)]
    seeds = [client.get(f"/v1/videos/{i}").json()["request"]["seed"] for i in ids]
    assert all(isinstance(s, int) for s in seeds) and seeds[0] != seeds[1]


def test_image_is_stored_as_png(env):
    client, store, artifacts, _ = env
    resp = client.post("/v1/videos/generations", json={"prompt": "p", "image_url": _png_data_uri()})
    assert resp.status_code == 202, resp.text
    job = store.get(resp.json()["request_id"])
    img = Image.open(io.BytesIO(artifacts.read_bytes(job.params.image_key)))
    assert img.format == "PNG" and img.size == (40, 30)


def test_aspect_and_resolution_sizes(env):
    client, *_ = env
    cases = {("720p", "16:9"): (1280, 704), ("480p", "9:16"): (480, 864), ("480p", "1:1"): (480, 480)}
    for (res, ar), size in cases.items():
        rid = client.post("/v1/videos/generations", json={"prompt": "p", "resolution": res, "aspect_ratio": ar}).json()["request_id"]
        req = client.get(f"/v1/videos/{rid}").json()["request"]
        assert (req["width"], req["height"]) == size


BAD_INPUTS = [
    ({}, 422, "prompt"),
    ({"prompt": ""}, 422, "prompt"),
    ({"prompt": "   "}, 422, "prompt"),
    ({"prompt": "x" * 4001}, 422, "prompt"),
    ({"prompt": 5}, 422, "prompt"),
    ({"prompt": "p", "negative_prompt": "x" * 4001}, 422, "negative_prompt"),
    ({"prompt": "p", "duration": 0.5}, 422, "duration"),
    ({"prompt": "p", "duration": 16}, 422, "duration"),
    ({"prompt": "p", "duration": "long"}, 422, "duration"),
    ({"prompt": "p", "num_inference_steps": 0}, 422, "num_inference_steps"),
    ({"prompt": "p", "num_inference_steps": 101}, 422, "num_inference_steps"),
    ({"prompt": "p", "guidance_scale": 0.5}, 422, "guidance_scale"),
    ({"prompt": "p", "guidance_scale": 21}, 422, "guidance_scale"),
    ({"prompt": "p", "fps": 2}, 422, "fps"),
    ({"prompt": "p", "seed": -1}, 422, "seed"),
    ({"prompt": "p", "resolution": "1080p"}, 422, "resolution"),
    ({"prompt": "p", "aspect_ratio": "21:9"}, 422, "aspect_ratio"),
    ({"prompt": "p", "model": "sora-9"}, 400, "model"),
    ({"prompt": "p", "durration": 3}, 422, "durration"),
    ({"prompt": "p", "image_url": "https://127.0.0.1/cat.png"}, 400, "image_url"),  # loopback: refused unfetched
    ({"prompt": "p", "image": {"url": "https://169.254.169.254/latest"}}, 400, "image.url"),
    ({"prompt": "p", "image": {"url": "data:image/png;base64,AA=="}, "image_url": "data:,x"}, 422, "body"),
    ({"prompt": "p", "reference_images": [{"url": "data:image/png;base64,AA=="}]}, 422, "reference_images"),
    ({"prompt": "p", "image_url": "data:image/png;base64,@@@not-base64@@@"}, 400, "image_url"),
    ({"prompt": "p", "image_url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}, 400, "image_url"),
    ({"prompt": "p", "image_url": "data:text/plain;base64," + base64.b64encode(b"hello").decode()}, 400, "image_url"),
    ({"prompt": "p", "image_url": "data:image/png,rawbytes"}, 400, "image_url"),
]


@pytest.mark.parametrize("body,status,param", BAD_INPUTS)
def test_bad_generation_input(env, body, status, param):
    client, store, _, nudges = env
    before = _snapshot(store)
    resp = client.post("/v1/videos/generations", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["message"] and err["code"] and err["type"]
    assert _snapshot(store) == before and nudges == []


@pytest.mark.parametrize(
    "raw,content_type",
    [(b"{not json", "application/json"), (b"[1, 2]", "application/json"), (b"", "application/json")],
)
def test_malformed_body(env, raw, content_type):
    client, store, *_ = env
    resp = client.post("/v1/videos/generations", content=raw, headers={"Content-Type": content_type})
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.json()["error"]["param"] in ("body", "prompt")
    assert _snapshot(store) == []


def test_oversized_body_is_413(env):
    client, *_ = env
    big = '{"prompt": "' + "x" * (17 * 1024 * 1024) + '"}'
    resp = client.post("/v1/videos/generations", content=big, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["param"] == "body"


def test_unknown_ids_are_404_json(env):
    client, *_ = env
    routes = [
        ("GET", "/v1/videos/nope"), ("POST", "/v1/videos/nope/cancel"), ("DELETE", "/v1/videos/nope"),
        ("GET", "/v1/videos/nope/content"),
    ]
    for method, path in routes:
        resp = client.request(method, path)
        assert resp.status_code == 404 and resp.json()["error"]["param"] == "id", path
    assert client.get("/v1/nothing-here").status_code == 404


def test_cancel_queued_then_conflict(env):
    client, store, *_ = env
    rid = client.post("/v1/videos/generations", json={"prompt": "p"}).json()["request_id"]
    resp = client.post(f"/v1/videos/{rid}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert store.claim_next() is None  # a cancelled queued job never runs
    before = _snapshot(store)
    again = client.post(f"/v1/videos/{rid}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
    assert _snapshot(store) == before


def test_content_of_unfinished_job_is_409(env):
    client, *_ = env
    rid = client.post("/v1/videos/generations", json={"prompt": "p"}).json()["request_id"]
    resp = client.get(f"/v1/videos/{rid}/content")
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "video_not_ready"


def test_content_supports_range(env):
    client, store, artifacts, _ = env
    rid = client.post("/v1/videos/generations", json={"prompt": "p"}).json()["request_id"]
    job = store.claim_next()
    payload = bytes(range(256)) * 40
    artifacts.put_bytes(f"outputs/{rid}/video.mp4", payload)
    store.complete(rid, job.attempt, {"artifact_key": f"outputs/{rid}/video.mp4", "duration_s": 2.0, "width": 864, "height": 480, "fps": 24.0, "has_audio": True})
    body = client.get(f"/v1/videos/{rid}").json()
    assert body["status"] == "done" and body["video"]["url"].endswith(f"/v1/videos/{rid}/content")
    full = client.get(f"/v1/videos/{rid}/content")
    assert full.status_code == 200 and full.content == payload and full.headers["accept-ranges"] == "bytes"
    part = client.get(f"/v1/videos/{rid}/content", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == payload[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(payload)}"
    tail = client.get(f"/v1/videos/{rid}/content", headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == payload[-10:]
    bad = client.get(f"/v1/videos/{rid}/content", headers={"Range": f"bytes={len(payload)}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(payload)}"


def test_parse_range_edges():
    assert parse_range(None, 10).partial is False
    assert (parse_range("bytes=5-", 10).start, parse_range("bytes=5-", 10).end) == (5, 9)
    assert parse_range("bytes=2-100", 10).end == 9
    assert parse_range("bytes=0-1,4-5", 10).partial is False  # multi-range: full body
    with pytest.raises(ApiError):
        parse_range("bytes=10-", 10)


def test_models_health_and_openapi(env):
    client, *_ = env
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny"] and models[0]["default"] is True
    assert client.get("/v1/models/tiny").status_code == 200
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/v1/videos/generations" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_running_cancel_sets_flag_not_status(env):
    client, store, *_ = env
    rid = client.post("/v1/videos/generations", json={"prompt": "p"}).json()["request_id"]
    job = store.claim_next()
    resp = client.post(f"/v1/videos/{rid}/cancel")
    assert resp.status_code == 200 and resp.json()["state"] == "running"
    assert store.report_progress(rid, job.attempt, 0.5) == "cancel"  # the denoiser's hook sees the cancel
    assert store.mark_cancelled(rid, job.attempt)
    assert store.get(rid).status == JobStatus.CANCELLED


def test_events_stream_until_terminal(env):
    client, store, *_ = env
    rid = client.post("/v1/videos/generations", json={"prompt": "p"}).json()["request_id"]
    job = store.claim_next()
    store.report_progress(rid, job.attempt, 0.5)
    store.fail(rid, job.attempt, {"type": "server_error", "code": "x", "message": "boom"})
    with client.stream("GET", f"/v1/videos/{rid}/events") as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        text = "".join(resp.iter_text())
    assert "event: status" in text and '"status":"failed"' in text  # stream closes after a terminal status
    assert client.get("/v1/videos/nope/events").status_code == 404
    assert client.get(f"/v1/videos/{rid}/events", params={"timeout": -1}).json()["error"]["param"] == "timeout"
