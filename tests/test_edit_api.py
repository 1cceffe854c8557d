"""`POST /v1/videos/edits` without Ray: real FastAPI app, SQLite store, local artifacts, real MP4s (PyAV).
Bad input gets a 4xx JSON error naming the field, and nothing stored changes (rows or artifacts)."""

from __future__ import annotations

import base64
import io
import os

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from job_helpers import generation_job

from imagine.api.errors import ApiError
from imagine.api.principal import Principal
from imagine.api.routes import create_api
from imagine.api.schemas import EditRequest
from imagine.api.service import JobService
from imagine.config import AppConfig, KeyLimits
from imagine.jobs import EditInstruction, EditMask, EditParams, JobStore
from imagine.models.presets import get_preset
from imagine.pipeline.media import mux_mp4
from imagine.pipeline.types import DecodedMedia
from imagine.storage import LocalArtifactStore

W, H, F, FPS = 64, 48, 25, 24.0


def _mp4(frames: int = F, width: int = W, height: int = H, fps: float = FPS, value: int | None = None) -> bytes:
    rng = np.random.default_rng(frames + width)
    pixels = rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8) if value is None else np.full(
        (frames, height, width, 3), value, np.uint8
    )
    t = np.arange(int(16000 * frames / fps)) / 16000
    audio = np.stack([np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32) * 0.3
    buf = io.BytesIO()
    mux_mp4(DecodedMedia(pixels, audio, 16000, fps), buf)
    return buf.getvalue()


def _uri(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def source_mp4() -> bytes:
    return _mp4()


@pytest.fixture()
def env(tmp_path, source_mp4):
    config = AppConfig(home=tmp_path, auth={"enabled": False})
    store = JobStore(config.resolved_database_url)
    artifacts = LocalArtifactStore(config.resolved_artifacts_dir)
    service = JobService(
        config, store, artifacts, {"tiny": get_preset("tiny")}, "tiny", edit_presets={"tiny-vace": get_preset("tiny-vace")}
    )
    # a done generation of the default tenant to edit by id
    done = store.create(generation_job(params={"duration": F / FPS, "resolution": "480p"}))
    artifacts.put_bytes(f"outputs/{done.id}/video.mp4", source_mp4)
    job = store.claim(done.id)
    store.complete(done.id, job.attempt, {
        "artifact_key": f"outputs/{done.id}/video.mp4", "width": W, "height": H, "num_frames": F, "fps": FPS,
        "duration_s": F / FPS, "has_audio": True,
    })
    client = TestClient(create_api(service), raise_server_exceptions=False)
    yield client, service, store, artifacts, done.id
    store.close()


def _snapshot(store: JobStore, artifacts: LocalArtifactStore) -> tuple:
    with store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM jobs ORDER BY id")]
    root = artifacts.root
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
    return rows, files


def test_edit_by_id_with_words(env):
    client, _, store, _, done_id = env
    resp = client.post("/v1/videos/edits", json={"prompt": "remove the man walking in the background", "video_id": done_id})
    assert resp.status_code == 202, resp.text
    job = store.get(resp.json()["request_id"])
    assert job.kind == "edit" and job.pool == "editor" and job.model == "tiny-vace"
    p = job.params
    assert isinstance(p, EditParams)
    assert (p.width, p.height, p.num_frames, p.fps) == (W, H, F, FPS)
    assert p.source_key == f"outputs/{done_id}/video.mp4" and p.mask is None and p.mask_key is None
    assert p.instruction.op == "remove" and p.instruction.place.kind == "background"
    assert p.instruction.target == "man walking" and p.source_job_id == done_id
    body = client.get(f"/v1/videos/{job.id}").json()
    assert body["kind"] == "edit" and body["state"] == "queued"
    assert "source_key" not in body["request"] and body["request"]["source_job_id"] == done_id


def test_edit_upload_with_boxes_and_free_text(env, source_mp4):
    client, _, store, artifacts, _ = env
    resp = client.post("/v1/videos/edits", json={
        "prompt": "make it glow", "video_url": _uri(source_mp4), "mask": {"boxes": [[4, 4, 30.5, 40]]}, "seed": 3,
    })
    assert resp.status_code == 202, resp.text
    job = store.get(resp.json()["request_id"])
    p = job.params
    assert artifacts.read_bytes(p.source_key) == source_mp4 and p.source_job_id is None
    assert p.mask == EditMask(boxes=[[4.0, 4.0, 30.5, 40.0]])
    assert p.instruction == EditInstruction(op="inpaint", replacement="make it glow") and p.seed == 3
    assert p.source_has_audio is True and p.resolution == "480p"


def test_edit_per_frame_boxes_and_mask_video(env, source_mp4):
    client, _, store, artifacts, done_id = env
    resp = client.post("/v1/videos/edits", json={
        "prompt": "replace the car with a red bus", "video_id": done_id, "mask": {"frames": {"0": [[0, 0, 8, 8]], "3": []}},
    })
    assert resp.status_code == 202, resp.text
    assert store.get(resp.json()["request_id"]).params.mask == EditMask(frames={0: [[0.0, 0.0, 8.0, 8.0]], 3: []})
    mask = _mp4(value=255)
    resp = client.post("/v1/videos/edits", json={"prompt": "add a tree on the left", "video_id": done_id,
                                                  "mask": {"video_url": _uri(mask)}})
    assert resp.status_code == 202, resp.text
    job = store.get(resp.json()["request_id"])
    assert job.params.mask == EditMask(video=True) and artifacts.read_bytes(job.params.mask_key) == mask


LONG = _mp4(frames=9 * 8, fps=8.0)  # 9 s > the 8.7 s default limit


def _odd_or_mulaw(width: int, audio_codec: str | None) -> bytes:
    """A clip the editor could not write back: an odd width (4:4:4 H.264 allows it, 4:2:0 does not), or audio in a
    codec an MP4 cannot carry (in a QuickTime file)."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mov") as container:
        video = container.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = width, H, "yuv444p" if width % 2 else "yuv420p"
        if audio_codec is not None:
            audio = container.add_stream(audio_codec, rate=8000, layout="mono")
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
            samples.sample_rate, samples.pts = 8000, 0
            container.mux(audio.encode(samples))
            container.mux(audio.encode(None))
        for _ in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((H, width, 3), np.uint8), format="rgb24")
            container.mux(video.encode(frame.reformat(format=video.pix_fmt)))
        container.mux(video.encode(None))
    return buf.getvalue()


BAD_EDITS = [
    # (body (video_id "DONE" is replaced by the done job's id), status, code, param)
    ({"prompt": "remove the dog", "video_id": "nope"}, 404, "not_found", "video_id"),
    ({"prompt": "remove the dog"}, 422, "invalid_parameter", "video_id"),
    ({"prompt": "remove the dog", "video_id": "DONE", "video_url": "data:video/mp4;base64,AAAA"}, 422, "invalid_parameter", "video_id"),
    ({"prompt": "   ", "video_id": "DONE"}, 422, "invalid_parameter", "prompt"),
    ({"prompt": "", "video_id": "DONE"}, 422, "invalid_parameter", "prompt"),
    ({"prompt": "make it better", "video_id": "DONE"}, 422, "unparseable_instruction", "prompt"),
    ({"prompt": "remove the dog", "video_url": "https://10.0.0.1/a.mp4"}, 400, "remote_url_forbidden", "video_url"),
    ({"prompt": "remove the dog", "video": {"url": "http://[::1]/a.mp4"}}, 400, "unsupported_video_url", "video.url"),
    ({"prompt": "remove the dog", "video_url": "data:video/mp4;base64,AAAAAAAAAAAA"}, 400, "invalid_video", "video_url"),
    ({"prompt": "remove the dog", "video_url": "data:video/mp4;base64,%%%"}, 400, "invalid_video_url", "video_url"),
    ({"prompt": "remove the dog", "video_url": "data:image/png;base64,AAAA"}, 400, "invalid_video_url", "video_url"),
    ({"prompt": "remove the dog", "video_url": _uri(LONG)}, 422, "video_too_long", "video_url"),
    ({"prompt": "remove the dog", "video_url": _uri(_odd_or_mulaw(W - 1, None))}, 422, "unsupported_video", "video_url"),
    ({"prompt": "remove the dog", "video_url": _uri(_odd_or_mulaw(W, "pcm_mulaw"), "video/quicktime")}, 422,
     "unsupported_video", "video_url"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"boxes": [[0, 0, W + 1, 10]]}}, 422, "invalid_mask", "mask.boxes[0]"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"boxes": [[5, 5, 5, 10]]}}, 422, "invalid_mask", "mask.boxes[0]"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"boxes": [[-1, 0, 5, 10]]}}, 422, "invalid_mask", "mask.boxes[0]"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"boxes": [[0, 0, 5]]}}, 422, "missing_parameter", "mask.boxes.0.3"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"boxes": []}}, 422, "invalid_parameter", "mask"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"frames": {"99": [[0, 0, 5, 5]]}}}, 422, "invalid_mask", "mask.frames.99"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"frames": {"1": []}}}, 422, "invalid_mask", "mask.frames"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"boxes": [[0, 0, 5, 5]], "frames": {"1": []}}}, 422, "invalid_parameter", "mask"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"video_url": _uri(_mp4(width=32))}}, 422, "invalid_mask", "mask.video_url"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"video_url": _uri(_mp4(frames=F - 8))}}, 422, "invalid_mask", "mask.video_url"),
    ({"prompt": "remove the dog", "video_id": "DONE", "mask": {"polygon": []}}, 422, "unknown_parameter", "mask.polygon"),
    ({"prompt": "remove the dog", "video_id": "DONE", "strength": 0.5}, 422, "unknown_parameter", "strength"),
    ({"prompt": "remove the dog", "video_id": "DONE", "model": "tiny"}, 400, "model_not_found", "model"),
    ({"prompt": "remove the dog", "video_id": "DONE", "num_inference_steps": 0}, 422, "invalid_parameter", "num_inference_steps"),
]


@pytest.mark.parametrize("body,status,code,param", BAD_EDITS)
def test_bad_edits_name_the_field_and_change_nothing(env, body, status, code, param):
    client, _, store, artifacts, done_id = env
    if body.get("video_id") == "DONE":
        body = {**body, "video_id": done_id}
    before = _snapshot(store, artifacts)
    resp = client.post("/v1/videos/edits", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert (err["code"], err["param"]) == (code, param), err
    assert _snapshot(store, artifacts) == before


def test_unparseable_instruction_shows_accepted_forms(env):
    client, _, _, _, done_id = env
    err = client.post("/v1/videos/edits", json={"prompt": "make it better", "video_id": done_id}).json()["error"]
    assert "remove" in err["message"] and "add" in err["message"] and "移除" in err["message"]


def test_not_done_and_other_tenants_videos(env):
    client, service, store, _, done_id = env
    queued = store.create(generation_job())
    resp = client.post("/v1/videos/edits", json={"prompt": "remove the dog", "video_id": queued.id})
    assert resp.status_code == 409 and resp.json()["error"]["param"] == "video_id"
    other = Principal(tenant="other", key_id="k2", tier="standard", limits=KeyLimits())
    with pytest.raises(ApiError) as e:
        service.create("edit", EditRequest(prompt="remove the dog", video_id=done_id), other)
    assert e.value.status == 404


def test_edits_off_answers_404(tmp_path):
    config = AppConfig(home=tmp_path, auth={"enabled": False})
    store = JobStore(config.resolved_database_url)
    service = JobService(config, store, LocalArtifactStore(config.resolved_artifacts_dir), {"tiny": get_preset("tiny")}, "tiny")
    resp = TestClient(create_api(service)).post("/v1/videos/edits", json={"prompt": "remove the dog", "video_id": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "edits_disabled"
    store.close()


@pytest.mark.parametrize(
    "text",
    ["remove the man walking in the background", "移除背景中走过的行人", "replace the red car with a blue bicycle",
     "add a tree between the sofa and the lamp"],
)
def test_the_grounder_gets_the_instruction_the_ingress_parsed(text):
    """The stored typed instruction turns back into the parser's own value: grounding never parses again."""
    from types import SimpleNamespace

    from imagine.api.edits import edit_instruction
    from imagine.api.schemas import EditRequest
    from imagine.editing.instructions import parse_instruction
    from imagine.serving.edits import parsed_instruction

    stored = edit_instruction(EditRequest(prompt=text, video_id="x"))
    job = SimpleNamespace(id="j", params=SimpleNamespace(instruction=stored))
    assert parsed_instruction(job) == parse_instruction(text)
