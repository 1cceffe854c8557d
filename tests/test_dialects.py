"""The OpenAI and xAI dialects without Ray: the official `openai` SDK (its `client.videos`) against the real FastAPI app
and job store (over FastAPI's TestClient as the SDK's HTTP client), job completion simulated in the store as the
decoder would write it; the size / seconds / form mapping; the status tables; delete and list semantics; the JPEG
stills. The same SDK against the whole Serve stack: tests/test_edit_serving.py."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imagine.api.dialects import nest_form, openai_generation_body, parse_seconds, parse_size, render_openai
from imagine.api.errors import ApiError
from imagine.api.routes import create_api
from imagine.api.service import JobService
from imagine.config import AppConfig
from imagine.jobs import JobStatus, JobStore
from imagine.models.presets import get_preset
from imagine.pipeline.stills import sprite_indices, spritesheet_jpeg, store_stills, thumbnail_jpeg
from imagine.storage import LocalArtifactStore, output_video_key


@pytest.fixture()
def env(tmp_path):
    config = AppConfig(home=tmp_path, auth={"enabled": False})
    store = JobStore(config.resolved_database_url)
    artifacts = LocalArtifactStore(config.resolved_artifacts_dir)
    service = JobService(config, store, artifacts, {"tiny": get_preset("tiny")}, "tiny")
    http = TestClient(create_api(service), raise_server_exceptions=False, base_url="http://testserver")
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
    yield sdk, http, store, artifacts
    store.close()


def _finish(store: JobStore, artifacts, job_id: str) -> None:
    """Complete a job as the decoder does: an MP4 (bytes here) and its stills beside it."""
    job = store.claim(job_id)
    key = output_video_key(job.tenant, job.id)
    artifacts.put_bytes(key, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    frames = np.random.default_rng(0).integers(0, 255, (25, 96, 160, 3), dtype=np.uint8)
    stills = store_stills(artifacts, key, frames)
    p = job.params
    assert store.complete(job_id, job.attempt, {
        "artifact_key": key, "artifact_keys": stills, "bytes": 88, "duration_s": p.duration, "width": p.width,
        "height": p.height, "fps": p.fps, "num_frames": p.num_frames, "audio_duration_s": p.duration,
        "has_audio": True, "stage_seconds": {}}, retain_s=3600)


def _exists(artifacts, key: str) -> bool:
    from imagine.storage import ArtifactNotFound

    try:
        artifacts.size(key)
    except ArtifactNotFound:
        return False
    return True


def _png(w: int = 64, h: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def test_sdk_create_retrieve_list_download_delete(env):
    sdk, http, store, artifacts = env
    created = sdk.videos.create(prompt="a kettle whistling", model="sora-2", seconds="2", size="1280x720")
    assert created.status == "queued" and created.progress == 0 and created.object == "video"
    assert (created.size, created.seconds, created.model) == ("1280x704", "2", "tiny")  # alias -> the served model
    job = store.get(created.id)
    assert job.dialect == "openai" and (job.params.resolution, job.params.aspect_ratio) == ("720p", "16:9")

    with_image = sdk.videos.create(prompt="it moves", input_reference=("f.png", _png(), "image/png"), size="480x480")
    assert store.get(with_image.id).params.image_key is not None  # the uploaded file became the first frame
    # {image_url} references as JSON (this SDK version sends only files in `input_reference`)
    resp = http.post("/v1/videos", json={"prompt": "it moves", "input_reference": {
        "image_url": "data:image/png;base64," + base64.b64encode(_png()).decode()}})
    assert resp.status_code == 200, resp.text
    by_url = sdk.videos.retrieve(resp.json()["id"])
    assert store.get(by_url.id).params.image_key is not None

    store.claim(created.id) and store.report_progress(created.id, 1, 0.42)
    assert sdk.videos.retrieve(created.id).status == "in_progress"
    assert sdk.videos.retrieve(created.id).progress == 42
    store.request_cancel(created.id)  # a running job: cancel requested; the runner ends it
    store.mark_cancelled(created.id, 1)
    cancelled = sdk.videos.retrieve(created.id)
    assert cancelled.status == "failed" and cancelled.error.code == "cancelled"

    _finish(store, artifacts, with_image.id)
    done = sdk.videos.retrieve(with_image.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at and done.expires_at
    assert sdk.videos.download_content(with_image.id).read().startswith(b"\x00\x00\x00\x18ftyp")
    thumb = Image.open(io.BytesIO(sdk.videos.download_content(with_image.id, variant="thumbnail").read()))
    assert thumb.format == "JPEG" and thumb.size == (160, 96)
    sheet = Image.open(io.BytesIO(sdk.videos.download_content(with_image.id, variant="spritesheet").read()))
    assert sheet.size == (5 * 160, 2 * 96)

    # an xAI-shaped job in the same store: its own shape on GET, OpenAI's in the list
    native = http.post("/v1/videos/generations", json={"prompt": "p", "model": "grok-imagine-video"}).json()
    body = http.get(f"/v1/videos/{native['request_id']}").json()
    assert (body["status"], body["state"], body["model"]) == ("pending", "queued", "tiny")
    ids = [created.id, with_image.id, by_url.id, native["request_id"]]
    page = sdk.videos.list(limit=2)
    assert [v.id for v in page.data] == ids[::-1][:2] and page.has_more
    assert [v.id for v in sdk.videos.list(limit=2)] == ids[::-1]  # auto-pagination follows last_id
    assert [v.id for v in sdk.videos.list(order="asc", limit=3)] == ids

    deleted = sdk.videos.delete(with_image.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (with_image.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        sdk.videos.retrieve(with_image.id)
    assert with_image.id not in [v.id for v in sdk.videos.list(limit=100)]
    record = store.get(with_image.id)
    assert record.deleted_at is not None and record.outputs_purged_at is not None  # its video and stills went now
    for key in [record.result["artifact_key"], *record.result["artifact_keys"].values()]:
        assert not _exists(artifacts, key), key


def test_sdk_errors_name_the_field(env):
    sdk, http, store, _ = env
    before = store.count_by_status()
    cases = [
        ({"size": "1000x10"}, openai.BadRequestError, "size"),
        ({"size": "big"}, openai.BadRequestError, "size"),
        ({"seconds": "forever"}, openai.BadRequestError, "seconds"),
        ({"seconds": "99"}, openai.UnprocessableEntityError, "duration"),
        ({"model": "sora-9"}, openai.BadRequestError, "model"),
    ]
    for extra, error, param in cases:
        with pytest.raises(error) as caught:
            sdk.videos.create(prompt="p", **extra)
        assert caught.value.body["param"] == param, (extra, caught.value.body)
    resp = http.post("/v1/videos", json={"prompt": "p", "input_reference": {"file_id": "file-1"}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_reference"
    resp = http.post("/v1/videos", json={"prompt": "p", "quality": "hd"})  # a field the SDK never sends
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "quality"
    resp = http.post("/v1/videos", json=["not", "an", "object"])
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "body"
    resp = http.post("/v1/videos", content=b"{", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert http.get("/v1/videos", params={"after": "nope"}).json()["error"]["param"] == "after"
    assert http.get("/v1/videos", params={"limit": 0}).status_code == 422
    with pytest.raises(openai.NotFoundError):
        sdk.videos.remix("no-such-video", prompt="remove the dog")
    assert store.count_by_status() == before  # nothing was stored by any of them


def test_extensions_are_routed_and_answer_501(env):
    _, http, _, _ = env
    resp = http.post("/v1/videos/extensions", json={"prompt": "more", "video": {"url": "data:,"}})
    assert resp.status_code == 501 and resp.json()["error"]["code"] == "not_implemented"
    assert http.post("/v1/videos/extensions", content=b"{").status_code == 400


def test_a_live_job_deleted_is_cancelled_and_swept_when_it_completes(env):
    sdk, http, store, artifacts = env
    video = sdk.videos.create(prompt="p")
    running = store.claim(video.id)
    assert http.delete(f"/v1/videos/{video.id}").json()["deleted"] is True
    assert store.get(video.id).cancel_requested
    # the runner finishes anyway (the cancel came after its last step): the outputs expire at once
    key = output_video_key(running.tenant, running.id)
    artifacts.put_bytes(key, b"x")
    p = running.params
    assert store.complete(video.id, running.attempt, {"artifact_key": key, "duration_s": p.duration, "width": p.width,
                                                       "height": p.height, "fps": p.fps, "num_frames": p.num_frames,
                                                       "has_audio": True}, retain_s=7 * 86400)
    from imagine.storage.retention import Sweeper

    assert store.get(video.id).expired()
    Sweeper(store, artifacts).sweep()
    assert not _exists(artifacts, key)


@pytest.mark.parametrize("size, expected", [
    ("1280x720", ("720p", "16:9")), ("720x1280", ("720p", "9:16")), ("864x480", ("480p", "16:9")),
    ("480x480", ("480p", "1:1")), ("1280X704", ("720p", "16:9")), ("640x480", ("480p", "4:3")),
])
def test_sizes_map_to_classes(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["1024x1792", "1792x1024", "100x100", "0x0", "x", "1280x720x3", "99999x1"])
def test_sizes_not_served_are_refused(size):
    with pytest.raises(ApiError) as caught:
        parse_size(size)
    assert caught.value.param == "size" and caught.value.status == 400


def test_form_fields_nest_and_refuse_repeats():
    assert nest_form([("prompt", "p"), ("video[id]", "v1")]) == {"prompt": "p", "video": {"id": "v1"}}
    with pytest.raises(ApiError):
        nest_form([("prompt", "a"), ("prompt", "b")])
    with pytest.raises(ApiError):
        nest_form([("video", "x"), ("video[id]", "v1")])
    assert parse_seconds("4") == 4.0
    with pytest.raises(ApiError):
        parse_seconds("nan")
    assert openai_generation_body({"prompt": "p", "seconds": "8", "size": "720x1280"}) == {
        "prompt": "p", "duration": 8.0, "resolution": "720p", "aspect_ratio": "9:16"}


def test_status_tables_cover_every_state(env):
    from imagine.api.dialects import OPENAI_STATUS, XAI_STATUS

    assert set(OPENAI_STATUS) == set(XAI_STATUS) == set(JobStatus)
    sdk, _, store, _ = env
    video = sdk.videos.create(prompt="p")
    assert render_openai(store.get(video.id)).status == "queued"


def test_stills_pick_frames_across_the_clip():
    frames = np.zeros((25, 480, 864, 3), dtype=np.uint8)
    for i in range(25):
        frames[i] = i * 10
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(frames)))
    assert thumb.size == (640, 356) and abs(int(np.asarray(thumb)[0, 0, 0]) - 120) <= 2  # frame 12, the middle
    assert sprite_indices(25) == [1, 3, 6, 8, 11, 13, 16, 18, 21, 23] and sprite_indices(3) == [0, 1, 2]
    sheet = np.asarray(Image.open(io.BytesIO(spritesheet_jpeg(frames))))
    assert sheet.shape == (2 * 89, 5 * 160, 3)
    assert abs(int(sheet[10, 10, 0]) - 10) <= 2 and abs(int(sheet[89 + 10, 4 * 160 + 10, 0]) - 230) <= 2
    assert len(spritesheet_jpeg(frames)) < 100_000
    with pytest.raises(ValueError):
        thumbnail_jpeg(np.zeros((0, 4, 4, 3), dtype=np.uint8))


def test_a_blank_remix_is_a_4xx_naming_the_prompt(env):
    _, http, _, _ = env
    resp = http.post("/v1/videos/some-id/remix", json={"prompt": "   "})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "prompt", resp.text
