"""The edit path on the whole Serve stack, over real HTTP on a local Ray: generate a clip, then edit it (explicit
boxes, an uploaded mask video, words through the grounder); the edited MP4 keeps the source's frames, rate, size
and audio packets, and pixels outside the dilated mask survive as well as a plain re-encode. The `editor` pool
here is sequence parallel (2 gloo ranks, Wan VACE Ulysses) and serves the single-rank edit; an edit cancels
within one step, and a realtime edit preempts a running batch edit, which resumes with the same frames.

The same app answers the hosted APIs' clients: the official `openai` SDK (`client.videos`: create as multipart with and
without an image file, create_and_poll, retrieve, list with cursor pagination, download_content of all three variants,
remix, delete), and requests written from xAI's docs (nested media objects fetched from a loopback media server that
config allow-lists, the `grok-imagine-video` alias, polling until `pending` ends, extensions answering 501)."""

from __future__ import annotations

import base64
import io

import av
import numpy as np
import pytest
import torch
from serve_helpers import SMALL, Served, serve_app, small_config

from imagine.config import AppConfig, EditConfig
from imagine.jobs import JobStore
from imagine.models.tiny import ensure_tiny_ltx2
from imagine.models.tiny_grounding import ensure_tiny_grounding
from imagine.models.tiny_vace import ensure_tiny_vace
from imagine.pipeline.masks import boxes_to_masks, dilate
from imagine.pipeline.media import read_video, remux_with_source_audio

pytestmark = pytest.mark.ray

DILATE_PX = 8
BOX = [96.0, 160.0, 256.0, 352.0]  # x0, y0, x1, y1 in the 480x480 source


def _config(home) -> AppConfig:
    return small_config(
        home,
        editor={"parallel": {"sequence": 2, "cpus_per_rank": 0.25, "timeout_s": 60}},
        # the tiny VACE repaints at 160x160 and upscales into the mask: fast on 2 cores, same code path as 480p
        edit={"enabled": True, "dilate_px": DILATE_PX, "max_work_pixels": 160 * 160, "default_steps": 2},
        # a loopback media server stands in for the internet (the address policy itself: tests/test_fetch.py)
        remote_media={"allow_http": True, "allow_hosts": ["127.0.0.1"]},
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_session):
    home = tmp_path_factory.mktemp("imagine-edit-home")
    for build in (ensure_tiny_ltx2, ensure_tiny_vace, ensure_tiny_grounding):  # once here, not in racing replicas
        build(home)
    with serve_app(_config(home)) as served:
        yield served


@pytest.fixture(scope="module")
def source(served):
    """A done generation (1 s, 480x480, 25 frames, with audio) and its MP4 bytes."""
    job_id = served.submit(seed=3, **SMALL)
    job = served.wait_terminal(job_id)
    assert job["status"] == "done", job
    return job_id, served.http.get(f"/v1/videos/{job_id}/content").content


def _edit(served: Served, **body) -> str:
    resp = served.http.post("/v1/videos/edits", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()["request_id"]


def _audio_packets(data: bytes) -> list[bytes]:
    with av.open(io.BytesIO(data)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def _psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    error = (a.double() - b.double())[where]
    return float(10 * torch.log10(255.0**2 / (error**2).mean()))


def _stored_result(served: Served, job_id: str) -> dict:
    store = JobStore(served.config.resolved_database_url)
    try:
        return store.get(job_id).result
    finally:
        store.close()


def _check_same_clip_outside(edited_mp4: bytes, source_mp4: bytes, masks: torch.Tensor) -> None:
    """Same frames / rate / size / audio packets as the source; outside the dilated mask, as close to the source
    as re-encoding the unedited source at the edit CRF gets; inside, repainted."""
    src, out = read_video(source_mp4), read_video(edited_mp4)
    assert (out.num_frames, out.height, out.width) == (src.num_frames, src.height, src.width)
    assert out.frame_rate == src.frame_rate
    assert out.has_audio and _audio_packets(edited_mp4) == _audio_packets(source_mp4)  # copied, not re-encoded

    outside = ~dilate(masks.bool(), DILATE_PX)
    plain = io.BytesIO()
    remux_with_source_audio(src.frames, src.frame_rate, src, plain, crf=EditConfig().mp4_crf)
    plain_psnr = _psnr(read_video(plain.getvalue()).frames, src.frames, outside)
    edited_psnr = _psnr(out.frames, src.frames, outside)
    assert plain_psnr - edited_psnr <= 1.0, (edited_psnr, plain_psnr)
    inside = masks.bool()
    assert _psnr(out.frames, src.frames, inside) < edited_psnr - 3.0  # the masked region really changed


def test_generate_then_edit_with_boxes(served, source):
    source_id, source_mp4 = source
    edit_id = _edit(served, video_id=source_id, prompt="remove the man in the background", mask={"boxes": [BOX]}, seed=1)
    job = served.wait_terminal(edit_id)
    assert job["status"] == "done", job
    assert job["kind"] == "edit" and job["progress"] == 1.0
    assert job["video"]["width"] == 480 and job["video"]["height"] == 480 and job["video"]["has_audio"]
    assert job["usage"]["device_seconds"] > 0
    edited = served.http.get(f"/v1/videos/{edit_id}/content").content
    src = read_video(source_mp4)
    _check_same_clip_outside(edited, source_mp4, boxes_to_masks([BOX], src.num_frames, src.height, src.width))

    result = _stored_result(served, edit_id)
    assert result["stage_seconds"]["grounding"] == 0.0  # explicit boxes: no grounding
    assert result["stage_seconds"]["denoise"] > 0
    # the source job is untouched
    assert served.http.get(f"/v1/videos/{source_id}/content").content == source_mp4


def test_upload_with_mask_video(served, source):
    _, source_mp4 = source
    src = read_video(source_mp4)
    masks = torch.zeros(src.num_frames, src.height, src.width, dtype=torch.bool)
    for i in range(src.num_frames):  # a box sliding right, one mask frame per source frame
        masks[i, 200:300, 40 + 8 * i : 140 + 8 * i] = True
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=src.frame_rate)
        stream.width, stream.height, stream.pix_fmt = src.width, src.height, "yuv420p"
        stream.options = {"crf": "0"}
        for mask in masks:
            rgb = np.repeat((mask.numpy() * 255).astype(np.uint8)[..., None], 3, axis=-1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    uri = "data:video/mp4;base64," + base64.b64encode(source_mp4).decode()
    mask_uri = "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode()
    edit_id = _edit(served, video_url=uri, prompt="a red ball bouncing", mask={"video_url": mask_uri}, seed=2)
    job = served.wait_terminal(edit_id)
    assert job["status"] == "done", job
    edited = served.http.get(f"/v1/videos/{edit_id}/content").content
    _check_same_clip_outside(edited, source_mp4, masks)
    result = _stored_result(served, edit_id)
    assert abs(result["mask_fraction"] - float(masks.float().mean())) < 0.002  # the mask video was read back


def test_edit_by_words_goes_through_the_grounder(served, source):
    source_id, source_mp4 = source
    edit_id = _edit(served, video_id=source_id, prompt="移除背景中走过的行人", seed=4)  # Chinese, words only
    job = served.wait_terminal(edit_id)
    assert job["status"] == "done", job
    result = _stored_result(served, edit_id)
    assert result["stage_seconds"]["grounding"] > 0 and 0 < result["mask_fraction"] < 1
    edited = read_video(served.http.get(f"/v1/videos/{edit_id}/content").content)
    src = read_video(source_mp4)
    assert (edited.num_frames, edited.height, edited.width, edited.frame_rate) == (
        src.num_frames, src.height, src.width, src.frame_rate
    )


def test_cancel_a_running_edit(served, source):
    source_id, _ = source
    edit_id = _edit(
        served, video_id=source_id, prompt="add a blooming tree on the left", mask={"boxes": [BOX]},
        num_inference_steps=100, seed=5,
    )
    served.wait_for(edit_id, lambda j: j["state"] == "running" and j["progress"] > 0)
    resp = served.http.post(f"/v1/videos/{edit_id}/cancel")
    assert resp.status_code == 200, resp.text
    steps_at_cancel = round(resp.json()["progress"] / 0.95 * 100)
    final = served.wait_terminal(edit_id, timeout=60)
    assert final["status"] == "cancelled" and final["video"] is None
    assert round(final["progress"] / 0.95 * 100) - steps_at_cancel <= 1, (steps_at_cancel, final["progress"])
    assert final["usage"]["price_usd"] == 0 and final["usage"]["device_seconds"] > 0
    # the editor is free again
    after = _edit(served, video_id=source_id, prompt="remove the lamp", mask={"boxes": [BOX]}, seed=6)
    assert served.wait_terminal(after)["status"] == "done"


def _frames(served: Served, job_id: str) -> torch.Tensor:
    return read_video(served.http.get(f"/v1/videos/{job_id}/content").content).frames


def test_sp2_editor_serves_the_single_rank_edit(served, source):
    """The SP2 `editor` pool's MP4 against the same edit run in this process on one rank (`InpaintStage`, the
    config's dilation / feather / working size, the job's own derived prompts) and encoded the same way."""
    from imagine.models.loading import load_components
    from imagine.pipeline.vace import EDIT_COMPONENTS, InpaintStage
    from imagine.serving.scheduler import edit_spec_from_job

    source_id, source_mp4 = source
    edit_id = _edit(served, video_id=source_id, prompt="replace the car with a bicycle", mask={"boxes": [BOX]},
                    seed=8, num_inference_steps=3)
    assert served.wait_terminal(edit_id)["status"] == "done"
    store = JobStore(served.config.resolved_database_url)
    try:
        spec = edit_spec_from_job(store.get(edit_id))
    finally:
        store.close()
    cfg = served.config.edit
    stage = InpaintStage(
        load_components(ensure_tiny_vace(served.config.home), EDIT_COMPONENTS), dilation_px=cfg.dilate_px,
        feather_px=cfg.feather_px, max_pixels=cfg.max_work_pixels,
    )
    src = read_video(source_mp4)
    local = stage(src.frames, boxes_to_masks([BOX], src.num_frames, src.height, src.width), spec.prompt,
                  spec.negative_prompt, spec.seed, spec.num_inference_steps, spec.guidance_scale)
    buf = io.BytesIO()
    remux_with_source_audio(local, src.frame_rate, src, buf, crf=cfg.mp4_crf, preset=served.config.mp4_preset)
    local_frames, served_frames = read_video(buf.getvalue()).frames, _frames(served, edit_id)
    assert served_frames.shape == local_frames.shape
    # x264 may decide differently for inputs a few 1e-6 apart: near-identical clips score > 35 dB, another seed ~10
    mse = (served_frames.double() - local_frames.double()).pow(2).mean()
    assert 10 * torch.log10(255.0**2 / mse) > 35.0, float(mse)


def test_realtime_edit_preempts_a_running_batch_edit_which_resumes_identically(served, source):
    source_id, _ = source
    params = {"video_id": source_id, "prompt": "add a blooming tree on the left", "mask": {"boxes": [BOX]},
              "num_inference_steps": 30, "seed": 12}
    reference = _edit(served, **params)
    assert served.wait_terminal(reference)["status"] == "done"
    stored = _stored_result(served, reference)
    step_s = stored["stage_seconds"]["denoise"] / params["num_inference_steps"]

    resp = served.http.post("/v1/videos/edits", json=params, headers={"X-Priority": "batch"})
    assert resp.status_code == 202, resp.text
    victim = resp.json()["request_id"]
    served.wait_for(victim, lambda j: j["state"] == "running" and j["progress"] > 0.1)
    resp = served.http.post("/v1/videos/edits", json={**params, "num_inference_steps": 2, "seed": 13},
                            headers={"X-Priority": "realtime"})
    assert resp.status_code == 202, resp.text
    urgent = served.wait_terminal(resp.json()["request_id"])
    assert urgent["status"] == "done", urgent
    # the realtime edit waited for one step boundary of the paused one (plus dispatch and its own conditioning),
    # not for the batch edit's remaining steps
    assert urgent["started_at"] - urgent["created_at"] < 5 * step_s + 2.0, (urgent, step_s)

    assert served.wait_terminal(victim, timeout=240)["status"] == "done"
    store = JobStore(served.config.resolved_database_url)
    try:
        job = store.get(victim)
        assert job.preemptions == 1 and job.attempt == 2
    finally:
        store.close()
    # checkpointed at a step boundary (VACE latents + UniPC's history) and resumed: the uninterrupted run's frames
    # (not byte-equal MP4s: separate processes' float32 GEMMs are not bit-reproducible; see test_serving's twin)
    a, b = _frames(served, reference).double(), _frames(served, victim).double()
    assert a.shape == b.shape
    diff = a - b
    differing = float((diff != 0).double().mean())
    assert differing < 0.01, f"{differing:.2%} of pixels differ"
    if differing:
        assert float(10 * torch.log10(255.0**2 / diff.square().mean())) > 50


# -- the hosted APIs' clients -------------------------------------------------------------------------------------


def _png(width: int = 480, height: int = 480) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _poll_openai(client, video_id: str, timeout: float = 240.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed"):
            return video
        time.sleep(0.2)
    raise AssertionError(f"video {video_id} still {video.status} after {timeout}s")


@pytest.fixture(scope="module")
def media_server():
    """A loopback HTTP server of media files (path -> bytes), standing in for a CDN."""
    import http.server
    import threading

    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()


def test_the_openai_sdk_drives_the_whole_video_lifecycle(served, source):
    import openai
    from PIL import Image

    from imagine.pipeline.media import probe

    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused-auth-is-off", max_retries=0)
    first = client.videos.create_and_poll(prompt="a kettle whistling", seconds="1", size="480x480",
                                          poll_interval_ms=200)
    assert first.status == "completed" and first.progress == 100 and first.object == "video", first
    assert (first.size, first.seconds, first.completed_at is not None) == ("480x480", "1", True)
    with_image = client.videos.create(prompt="the same frame, moving", seconds="1", size="480x480",
                                      input_reference=("frame.png", _png(), "image/png"))  # multipart with a file
    assert with_image.status in ("queued", "in_progress")
    assert _poll_openai(client, with_image.id).status == "completed"

    mp4 = client.videos.download_content(first.id).read()
    info = probe(mp4)
    assert (info.video_codec, info.audio_codec, info.width, info.height) == ("h264", "aac", 480, 480)
    thumbnail = Image.open(io.BytesIO(client.videos.download_content(first.id, variant="thumbnail").read()))
    sheet = Image.open(io.BytesIO(client.videos.download_content(first.id, variant="spritesheet").read()))
    assert thumbnail.format == sheet.format == "JPEG" and thumbnail.size == (480, 480)
    assert sheet.size == (5 * 160, 2 * 160)  # 10 frames across the clip, 5 a row

    # the list holds every job of the tenant (the xAI-shaped `source` too), newest first, a page at a time
    page = client.videos.list(limit=1)
    assert len(page.data) == 1 and page.data[0].id == with_image.id and page.has_more
    listed = [v.id for v in client.videos.list(limit=1)]  # auto-pagination follows `after`
    assert listed.index(with_image.id) < listed.index(first.id) < listed.index(source[0])
    assert [v.id for v in client.videos.list(order="asc", limit=100)] == listed[::-1]

    remix = client.videos.remix(first.id, prompt="remove the kettle")
    assert remix.remixed_from_video_id == first.id
    done = _poll_openai(client, remix.id)
    assert done.status == "completed", done.error
    assert probe(client.videos.download_content(remix.id).read()).num_frames == info.num_frames

    deleted = client.videos.delete(with_image.id)
    assert deleted.deleted and deleted.id == with_image.id and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(with_image.id)
    assert with_image.id not in [v.id for v in client.videos.list(limit=100)]
    with pytest.raises(openai.BadRequestError, match="size"):
        client.videos.create(prompt="p", size="1000x10")


def test_requests_written_from_xais_docs(served, source, media_server):
    import time

    base, files = media_server
    files["/frame.png"] = _png()
    files["/clip.mp4"] = source[1]

    def poll(job_id: str) -> dict:
        deadline = time.monotonic() + 240
        while (job := served.job(job_id))["status"] == "pending":
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        return job

    resp = served.http.post("/v1/videos/generations", json={
        "model": "grok-imagine-video", "prompt": "waves on rocks", "duration": 1, "aspect_ratio": "1:1",
        "resolution": "480p", "image": {"url": f"{base}/frame.png"}})
    assert resp.status_code == 202, resp.text
    job = poll(resp.json()["request_id"])
    assert (job["status"], job["state"], job["request"]["has_image"]) == ("done", "done", True), job
    assert job["model"] == served.config.model.preset  # the alias ran on the served model
    assert job["video"]["url"]

    resp = served.http.post("/v1/videos/edits", json={
        "prompt": "remove the rock", "video": {"url": f"{base}/clip.mp4"}, "mask": {"boxes": [BOX]}})
    assert resp.status_code == 202, resp.text
    edit = poll(resp.json()["request_id"])
    assert edit["status"] == "done" and edit["video"]["width"] == 480, edit

    refused = served.http.post("/v1/videos/generations", json={
        "prompt": "p", "image": {"url": "http://10.0.0.1/secret.png"}})  # not allow-listed: a private address
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "image.url", refused.text
    assert refused.json()["error"]["code"] == "remote_url_forbidden"
    missing = served.http.post("/v1/videos/generations", json={"prompt": "p", "image": {"url": f"{base}/nope.png"}})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "image.url", missing.text
    refs = served.http.post("/v1/videos/generations", json={"prompt": "p", "reference_images": [{"url": "data:,"}]})
    assert refs.status_code == 422 and refs.json()["error"]["param"] == "reference_images"
    ext = served.http.post("/v1/videos/extensions", json={"prompt": "more", "video": {"url": f"{base}/clip.mp4"}})
    assert ext.status_code == 501 and ext.json()["error"]["code"] == "not_implemented"
