"""Retention: an ended job's inputs, checkpoint and work files are deleted however it ended; a done job's video
expires (410 naming the expiry, job row kept) and is deleted; sweepers racing on one store are safe; keys carry the
tenant."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient
from job_helpers import generation_job

from imagine.api.routes import create_api
from imagine.api.schemas import GenerationRequest
from imagine.api.service import JobService
from imagine.config import AppConfig
from imagine.jobs import JobStatus, JobStore
from imagine.models.presets import get_preset
from imagine.storage import ArtifactStore, open_artifact_store
from imagine.storage.keys import (
    checkpoint_key,
    grounded_masks_key,
    input_image_key,
    input_source_key,
    output_video_key,
    scratch_keys,
    tenant_component,
)
from imagine.storage.retention import Sweeper


def _result(store: ArtifactStore, tenant: str, job_id: str, video: bytes = b"mp4 bytes") -> dict:
    key = output_video_key(tenant, job_id)
    store.put_bytes(key, video)
    return {"artifact_key": key, "bytes": len(video), "duration_s": 2.0, "width": 864, "height": 480, "fps": 24.0,
            "num_frames": 49, "audio_duration_s": 2.0, "has_audio": True, "stage_seconds": {}}


def _exists(store: ArtifactStore, key: str) -> bool:
    try:
        store.size(key)
        return True
    except KeyError:
        return False


def test_keys_carry_the_kind_then_a_safe_tenant_component():
    assert output_video_key("acme", "j1") == "outputs/acme/j1/video.mp4"
    assert checkpoint_key("acme", "j1") == "checkpoints/acme/j1/denoise_state.pt"
    for hostile in ("../etc", "a/b", "", "x" * 65, "ünï", "."):
        part = tenant_component(hostile)
        assert part.startswith("t-") and "/" not in part and part == tenant_component(hostile)  # stable
    assert tenant_component("a/b") != tenant_component("a_b")


@pytest.fixture(params=["local", "s3"])
def artifacts_config(request, tmp_path) -> AppConfig:
    if request.param == "local":
        return AppConfig(home=tmp_path, auth={"enabled": False})
    bucket, server = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_server")
    return AppConfig(home=tmp_path, auth={"enabled": False}, artifacts=f"s3://{bucket}/imagine",
                     s3={"endpoint_url": server})


def test_every_ended_job_loses_its_scratch_files_and_nothing_else(artifacts_config: AppConfig):
    """Done, failed, cancelled while paused by preemption (ended by the API, not a sampling loop), expired by its
    deadline: each one's inputs, checkpoint and grounded masks go in one sweep; queued and running jobs keep theirs;
    outputs stay (they have their own retention); the layout before tenant prefixes is swept too."""
    store, artifacts = JobStore(artifacts_config.resolved_database_url), open_artifact_store(artifacts_config)
    jobs = {name: store.create(generation_job(tenant="acme")) for name in
            ("done", "failed", "paused_cancelled", "expired", "queued", "running")}
    for job in jobs.values():
        for key in (input_image_key("acme", job.id), checkpoint_key("acme", job.id),
                    grounded_masks_key("acme", job.id), f"inputs/{job.id}/image.png"):
            artifacts.put_bytes(key, b"scratch")
    done = store.claim(jobs["done"].id)
    store.complete(done.id, done.attempt, _result(artifacts, "acme", done.id))
    failed = store.claim(jobs["failed"].id)
    store.fail(failed.id, failed.attempt, {"type": "server_error", "code": "generation_failed", "message": "x"})
    paused = store.claim(jobs["paused_cancelled"].id)
    store.requeue_preempted(paused.id, paused.attempt, checkpoint_key("acme", paused.id))
    store.request_cancel(paused.id)  # queued (paused) -> cancelled by the API: no loop ever sees it again
    with store.engine.begin() as conn:
        from imagine.jobs.store import jobs_table

        conn.execute(jobs_table.update().where(jobs_table.c.id == jobs["expired"].id).values(deadline_at=time.time() - 1))
    assert store.expire_overdue() == [jobs["expired"].id]
    store.claim(jobs["running"].id)

    counts = Sweeper(store, artifacts).sweep()
    assert counts.inputs == 4 and counts.outputs == 0
    for name, job in jobs.items():
        left = [k for k in scratch_keys("acme", job.id) if _exists(artifacts, k)]
        if name in ("queued", "running"):
            assert len(left) == 4, name  # the image, checkpoint, masks and the legacy-layout image
        else:
            assert left == [], (name, left)
    assert _exists(artifacts, output_video_key("acme", done.id))
    assert Sweeper(store, artifacts).sweep().inputs == 0  # idempotent: marked swept
    if not artifacts_config.artifacts_on_s3:  # emptied job folders go too
        assert not (artifacts_config.resolved_artifacts_dir / "inputs" / "acme" / done.id).exists()
    store.close()


def test_a_done_video_expires_410_then_is_deleted_and_the_job_stays(tmp_path):
    config = AppConfig(home=tmp_path, auth={"enabled": False})
    store, artifacts = JobStore(config.resolved_database_url), open_artifact_store(config)
    service = JobService(config, store, artifacts, {"tiny": get_preset("tiny")}, "tiny",
                         edit_presets={"tiny-vace": get_preset("tiny-vace")})
    client = TestClient(create_api(service), raise_server_exceptions=False)
    job = service.create("generation", GenerationRequest(prompt="a fox", duration=1)).job
    claimed = store.claim(job.id)
    store.complete(job.id, claimed.attempt, _result(artifacts, job.tenant, job.id), retain_s=1.0)

    body = client.get(f"/v1/videos/{job.id}").json()
    assert body["expires_at"] == pytest.approx(time.time() + 1.0, abs=0.5)
    assert body["video"]["url"].endswith(f"/v1/videos/{job.id}/content")
    assert client.get(f"/v1/videos/{job.id}/content").content == b"mp4 bytes"
    source = {"prompt": "remove the fox", "video_id": job.id}
    accepted = client.post("/v1/videos/edits", json=source)
    assert accepted.status_code == 202, accepted.text  # editable while kept

    time.sleep(1.1)
    gone = client.get(f"/v1/videos/{job.id}/content")
    assert gone.status_code == 410, gone.text
    error = gone.json()["error"]
    assert error["code"] == "video_expired" and error["param"] == "id" and "expired at 20" in error["message"]
    body = client.get(f"/v1/videos/{job.id}").json()
    assert body["status"] == "done" and body["video"]["url"] is None and body["video"]["width"] == 864
    refused = client.post("/v1/videos/edits", json=source)
    assert refused.status_code == 410 and refused.json()["error"]["param"] == "video_id"

    assert Sweeper(store, artifacts).sweep().outputs == 1
    assert not _exists(artifacts, output_video_key(job.tenant, job.id))
    assert store.get(job.id).status == JobStatus.DONE and store.get(job.id).outputs_purged_at is not None
    assert Sweeper(store, artifacts).sweep().outputs == 0
    store.close()


def test_presigned_url_never_outlives_the_video(tmp_path, s3_server, s3_bucket):
    from urllib.parse import parse_qs, urlparse

    config = AppConfig(home=tmp_path, auth={"enabled": False}, artifacts=f"s3://{s3_bucket}/imagine",
                       s3={"endpoint_url": s3_server, "presigned_url_ttl_s": 3600})
    store, artifacts = JobStore(config.resolved_database_url), open_artifact_store(config)
    service = JobService(config, store, artifacts, {"tiny": get_preset("tiny")}, "tiny")
    job = service.create("generation", GenerationRequest(prompt="a fox", duration=1)).job
    claimed = store.claim(job.id)
    store.complete(job.id, claimed.attempt, _result(artifacts, job.tenant, job.id), retain_s=120)
    video = service.to_response(store.get(job.id), "http://test").video
    assert int(parse_qs(urlparse(video.url).query)["X-Amz-Expires"][0]) <= 120
    assert video.expires_at <= store.get(job.id).expires_at + 1
    store.close()


def test_sweepers_racing_on_one_store_each_job_once(tmp_path, s3_server, s3_bucket):
    """Four replicas sweep at once (S3 + one store): every scratch file and expired output is gone, each job is
    counted swept exactly once, and no sweeper fails."""
    config = AppConfig(home=tmp_path, auth={"enabled": False}, artifacts=f"s3://{s3_bucket}/imagine",
                       s3={"endpoint_url": s3_server})
    store, artifacts = JobStore(config.resolved_database_url), open_artifact_store(config)
    ids = []
    for _ in range(24):
        job = store.create(generation_job(tenant="acme"))
        artifacts.put_bytes(input_source_key("acme", job.id), b"src")
        claimed = store.claim(job.id)
        store.complete(job.id, claimed.attempt, _result(artifacts, "acme", job.id), retain_s=0.01)
        ids.append(job.id)
    time.sleep(0.05)
    totals, errors = [], []

    def sweep() -> None:
        try:
            totals.append(Sweeper(JobStore(config.resolved_database_url), open_artifact_store(config), batch=5).sweep())
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sum(c.inputs for c in totals) == 24 and sum(c.outputs for c in totals) == 24
    for job_id in ids:
        assert not _exists(artifacts, input_source_key("acme", job_id))
        assert not _exists(artifacts, output_video_key("acme", job_id))
    store.close()
