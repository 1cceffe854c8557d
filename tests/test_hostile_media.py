"""Hostile uploads at `POST /v1/videos/edits` and `/v1/videos/generations` (issue 11), without Ray: real FastAPI
app, SQLite store, local artifacts, real MP4s (PyAV). Texts that make FFmpeg open sockets or files are refused
before FFmpeg sees them; a huge data-URI header costs a small multiple of the body; frame count, frame rate,
pixels and mask boxes are capped from config. Every refusal is a quick 4xx naming the field, and stores nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import time
import tracemalloc

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from job_helpers import generation_job

from imagine.api.edits import DEFAULT_MAX_MASK_BOXES, SourceInfo, check_mask, max_source_frames, probe_video
from imagine.api.errors import ApiError
from imagine.api.routes import create_api
from imagine.api.schemas import MaskSpec
from imagine.api.service import JobService
from imagine.config import AppConfig, EditConfig
from imagine.jobs import JobStore
from imagine.models.presets import get_preset
from imagine.pipeline.media import mux_mp4
from imagine.pipeline.types import DecodedMedia
from imagine.storage import LocalArtifactStore

W, H, F, FPS = 64, 48, 25, 24.0

SDP = (
    "v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n"
    "a=rtpmap:96 H264/90000\n"
)
FFCONCAT = "ffconcat version 1.0\nfile '/etc/passwd'\n"
HLS = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n"


def _mp4(frames: int = F, fps: float = FPS) -> bytes:
    pixels = np.random.default_rng(frames).integers(0, 255, (frames, H, W, 3), dtype=np.uint8)
    buf = io.BytesIO()
    mux_mp4(DecodedMedia(pixels, np.zeros((2, 1600), np.float32), 16000, fps), buf)
    return buf.getvalue()


def _uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def source_mp4() -> bytes:
    return _mp4()


def _env(tmp_path, source_mp4: bytes, **edit):
    config = AppConfig(home=tmp_path, auth={"enabled": False}, edit=edit)
    store = JobStore(config.resolved_database_url)
    artifacts = LocalArtifactStore(config.resolved_artifacts_dir)
    service = JobService(
        config, store, artifacts, {"tiny": get_preset("tiny")}, "tiny", edit_presets={"tiny-vace": get_preset("tiny-vace")}
    )
    done = store.create(generation_job(params={"duration": F / FPS, "resolution": "480p"}))
    artifacts.put_bytes(f"outputs/{done.id}/video.mp4", source_mp4)
    store.complete(done.id, store.claim(done.id).attempt, {
        "artifact_key": f"outputs/{done.id}/video.mp4", "width": W, "height": H, "num_frames": F, "fps": FPS,
        "duration_s": F / FPS, "has_audio": True,
    })
    return TestClient(create_api(service), raise_server_exceptions=False), store, artifacts, done.id


@pytest.fixture()
def env(tmp_path, source_mp4):
    client, store, artifacts, done_id = _env(tmp_path, source_mp4)
    yield client, store, artifacts, done_id
    store.close()


def _stored(store: JobStore, artifacts: LocalArtifactStore) -> tuple:
    with store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM jobs ORDER BY id")]
    root = artifacts.root
    return rows, sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _refused(client: TestClient, store, artifacts, body: dict, status: int, code: str, param: str,
             path: str = "/v1/videos/edits") -> str:
    """POST `body`; assert the 4xx error and that nothing was stored; the error's message."""
    before = _stored(store, artifacts)
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert _stored(store, artifacts) == before
    return err["message"]


# -- defect 1: FFmpeg never opens a socket, a file or a playlist on an upload's behalf ----------------------------


@pytest.mark.parametrize("text", [SDP, FFCONCAT, HLS], ids=["sdp", "ffconcat", "hls"])
@pytest.mark.parametrize("where", ["video_url", "mask.video_url"])
def test_network_and_playlist_texts_are_refused_before_ffmpeg_opens_them(env, monkeypatch, text, where):
    client, store, artifacts, done_id = env
    opened: list = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    upload = _uri(text.encode(), "application/octet-stream")
    body = (
        {"prompt": "remove the dog", "video_url": upload} if where == "video_url"
        else {"prompt": "remove the dog", "video_id": done_id, "mask": {"video_url": upload}}
    )
    start = time.monotonic()
    message = _refused(client, store, artifacts, body, 400, "invalid_video", where)
    assert time.monotonic() - start < 2.0  # an SDP used to bind UDP sockets and wait ~20 s for RTP
    assert opened == [] and "MP4/MOV and WebM/Matroska" in message


def test_a_real_mp4_upload_still_works(env, source_mp4):
    client, store, artifacts, _ = env
    resp = client.post("/v1/videos/edits", json={
        "prompt": "make it glow", "video_url": _uri(source_mp4), "mask": {"video_url": _uri(source_mp4)},
    })
    assert resp.status_code == 202, resp.text
    params = store.get(resp.json()["request_id"]).params
    assert (params.num_frames, params.fps, params.width) == (F, FPS, W)
    assert artifacts.read_bytes(params.source_key) == source_mp4


# -- defect 2: a huge data-URI header costs a small multiple of the body, and is refused quickly -----------------


@pytest.mark.parametrize(
    "path,field,code",
    [("/v1/videos/generations", "image_url", "invalid_image_url"), ("/v1/videos/edits", "video_url", "invalid_video_url")],
)
def test_a_16_mb_data_uri_header_is_refused_in_bounded_memory(env, path, field, code):
    client, store, artifacts, _ = env
    hostile = "data:x/y" + ";a=b" * (16_000_000 // 4)  # a backtracking regex took 80x this (1.2 GB) to refuse it
    body = json.dumps({"prompt": "remove the dog", field: hostile}).encode()
    before = _stored(store, artifacts)
    tracemalloc.start()
    try:
        start = time.monotonic()
        resp = client.post(path, content=body, headers={"content-type": "application/json"})
        elapsed = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert resp.status_code == 400, resp.text
    assert (resp.json()["error"]["code"], resp.json()["error"]["param"]) == (code, field)
    # the body as received plus its JSON string: about 3x (the parser itself adds nothing)
    assert peak < 4 * len(body), f"{peak} bytes for a {len(body)}-byte body"
    assert elapsed < 5.0 and _stored(store, artifacts) == before


# -- defect 4: frame count, frame rate, pixels and mask boxes are capped from config ------------------------------


def test_a_source_past_the_frame_rate_cap_is_refused(env):
    client, store, artifacts, _ = env
    fast = _mp4(frames=200, fps=1000.0)  # 0.2 s, well under max_source_s: the rate alone is refused
    message = _refused(client, store, artifacts, {"prompt": "remove the dog", "video_url": _uri(fast)}, 422,
                       "unsupported_video", "video_url")
    assert "1000 fps" in message and "120 fps" in message


def test_a_source_past_the_frame_cap_is_refused_by_id_and_by_upload(tmp_path, source_mp4):
    client, store, artifacts, done_id = _env(tmp_path, source_mp4, max_source_frames=F - 1)
    try:
        for body, param in (({"video_id": done_id}, "video_id"), ({"video_url": _uri(source_mp4)}, "video_url")):
            message = _refused(client, store, artifacts, {"prompt": "remove the dog", **body}, 422, "video_too_large",
                               param)
            assert str(F - 1) in message
    finally:
        store.close()


def test_a_source_past_the_pixel_cap_is_refused(tmp_path, source_mp4):
    client, store, artifacts, _ = _env(tmp_path, source_mp4, max_source_pixels=W * H - 1)
    try:
        _refused(client, store, artifacts, {"prompt": "remove the dog", "video_url": _uri(source_mp4)}, 422,
                 "video_too_large", "video_url")
    finally:
        store.close()


def test_mask_boxes_are_capped_in_all_before_any_is_checked():
    info = SourceInfo(W, H, F, FPS, F / FPS, True)
    frames = {i: [(0.0, 0.0, 4.0, 4.0)] * 3 for i in range(3)}  # 9 boxes over 3 frames
    with pytest.raises(ApiError) as e:
        check_mask(MaskSpec(frames={**frames, 99: [(-1.0, 0.0, 0.0, 0.0)]}), info, 1024, max_boxes=9)
    assert (e.value.status, e.value.code, e.value.param) == (422, "mask_too_large", "mask.frames")
    assert "10 boxes" in e.value.message and "9" in e.value.message  # counted first: key 99 and its box not checked
    assert check_mask(MaskSpec(frames=frames), info, 1024, max_boxes=9)[0].frames == {
        i: [[0.0, 0.0, 4.0, 4.0]] * 3 for i in range(3)
    }
    with pytest.raises(ApiError) as e:
        check_mask(MaskSpec(boxes=[(0.0, 0.0, 4.0, 4.0)] * 3), info, 1024, max_boxes=2)
    assert (e.value.code, e.value.param) == ("mask_too_large", "mask.boxes")
    assert DEFAULT_MAX_MASK_BOXES == EditConfig().max_mask_boxes == 4096


def test_upload_probing_stops_at_the_caps(source_mp4):
    with pytest.raises(ApiError) as e:
        probe_video(source_mp4, "video_url", max_frames=F - 1)
    assert (e.value.status, e.value.code, e.value.param) == (422, "video_too_large", "video_url")
    assert f"max_frames={F - 1}" in e.value.message
    with pytest.raises(ApiError) as e:
        probe_video(source_mp4, "video_url", max_pixels=W * H - 1)
    assert (e.value.code, e.value.param) == ("video_too_large", "video_url") and "max_pixels" in e.value.message
    assert probe_video(source_mp4, "video_url", max_frames=F, max_pixels=W * H).num_frames == F


def test_the_source_frame_cap_follows_duration_and_rate():
    assert max_source_frames(EditConfig()) == 1044  # 8.7 s at 120 fps
    assert max_source_frames(EditConfig(max_source_s=2, max_source_fps=30)) == 60
    assert max_source_frames(EditConfig(max_source_frames=10)) == 10


def test_the_default_box_cap_holds_a_large_request(env):
    client, store, artifacts, done_id = env
    frames = {str(i): [[0, 0, 4, 4]] * 200 for i in range(F)}  # 5000 boxes > the 4096 default
    _refused(client, store, artifacts, {"prompt": "x", "video_id": done_id, "mask": {"frames": frames}}, 422,
             "mask_too_large", "mask.frames")


def test_a_mask_video_longer_than_the_source_is_counted_only_to_the_source(env):
    client, store, artifacts, done_id = env
    message = _refused(client, store, artifacts,
                       {"prompt": "x", "video_id": done_id, "mask": {"video_url": _uri(_mp4(frames=F + 10))}}, 422,
                       "invalid_mask", "mask.video_url")
    assert f"more than max_frames={F}" in message
