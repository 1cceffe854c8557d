"""Artifact stores: the one contract over the local directory and S3 (a real S3-compatible server on loopback,
moto's server mode), multipart uploads that no reader sees half-done, presigned expiring URLs, the config that
chooses the store, and `video.url` / `/content` of a done job on S3."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import boto3
import httpx
import pytest
from pydantic import ValidationError

from imagine.config import AppConfig
from imagine.storage import ArtifactNotFound, LocalArtifactStore, open_artifact_store
from imagine.storage.s3 import S3ArtifactStore, parse_s3_uri

MiB = 2**20


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return S3ArtifactStore(f"s3://{bucket}/imagine/prod", endpoint_url=server, multipart_threshold=5 * MiB)


def test_the_store_contract(store, tmp_path):
    data = bytes(range(256)) * 1000
    assert store.put_bytes("inputs/j1/image.png", data) == len(data)
    assert store.size("inputs/j1/image.png") == len(data)
    assert store.read_bytes("inputs/j1/image.png") == data
    assert b"".join(store.iter_range("inputs/j1/image.png", 10, 5009, chunk_size=777)) == data[10:5010]
    with store.open("inputs/j1/image.png") as fh:
        fh.seek(100)
        assert fh.read(4) == data[100:104]
    src = tmp_path / "video.mp4"
    src.write_bytes(data[::-1])
    assert store.put_file("outputs/j1/video.mp4", src) == len(data)
    assert store.read_bytes("outputs/j1/video.mp4") == data[::-1]
    store.put_bytes("inputs/j1/image.png", b"v2")  # overwrite
    assert store.read_bytes("inputs/j1/image.png") == b"v2"
    store.delete("inputs/j1/image.png")
    store.delete("inputs/j1/image.png")  # idempotent
    for call in (store.size, store.read_bytes, store.open):
        with pytest.raises(ArtifactNotFound):
            call("inputs/j1/image.png")
    with pytest.raises(ArtifactNotFound):
        list(store.iter_range("nope/x", 0, 10))
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.put_bytes(bad, b"x")


def test_s3_keys_live_under_the_prefix(s3_server, s3_bucket):
    store = S3ArtifactStore(f"s3://{s3_bucket}/team/a/", endpoint_url=s3_server)
    store.put_bytes("outputs/j/video.mp4", b"x")
    listed = boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == ["team/a/outputs/j/video.mp4"]
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError, match="no bucket"):
        parse_s3_uri("s3:///x")


def test_large_files_go_up_in_parts_and_no_reader_sees_a_partial_object(s3_server, s3_bucket, tmp_path):
    store = S3ArtifactStore(f"s3://{s3_bucket}/p", endpoint_url=s3_server, multipart_threshold=5 * MiB)
    big = tmp_path / "big.mp4"
    big.write_bytes(b"\x07" * (11 * MiB + 3))
    assert store.put_file("outputs/j/video.mp4", big) == 11 * MiB + 3
    head = store.client.head_object(Bucket=s3_bucket, Key="p/outputs/j/video.mp4")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart object of 3 parts
    assert store.size("outputs/j/video.mp4") == 11 * MiB + 3

    # an upload that fails before its completion leaves nothing a reader could fetch
    def fail(**kwargs):
        raise RuntimeError("network gone before CompleteMultipartUpload")

    store.client.complete_multipart_upload = fail
    with pytest.raises(RuntimeError, match="network gone"):
        store.put_file("outputs/k/video.mp4", big)
    with pytest.raises(ArtifactNotFound):
        store.size("outputs/k/video.mp4")
    with pytest.raises(ValueError, match="5 MiB"):
        S3ArtifactStore(f"s3://{s3_bucket}/p", endpoint_url=s3_server, multipart_threshold=MiB)


def test_presigned_urls_download_without_credentials_and_expire(s3_server, s3_bucket):
    store = S3ArtifactStore(f"s3://{s3_bucket}/p", endpoint_url=s3_server)
    store.put_bytes("outputs/j/video.mp4", b"mp4 bytes")
    url = store.presigned_url("outputs/j/video.mp4", 3600)
    resp = httpx.get(url)  # no AWS credentials, no API key
    assert resp.status_code == 200 and resp.content == b"mp4 bytes"
    # SigV4 query signing: S3 refuses the URL once X-Amz-Date + X-Amz-Expires has passed (moto's server does not
    # enforce expiry, so the signed fields are what is checked here)
    query = parse_qs(urlparse(url).query)
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and query["X-Amz-Expires"] == ["3600"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert abs(signed_at.timestamp() - time.time()) < 60
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="7 days"):
            store.presigned_url("outputs/j/video.mp4", bad)
    assert LocalArtifactStore(Path("/tmp")).presigned_url("x", 60) is None


def test_config_chooses_the_store_and_no_path_field_takes_a_uri(tmp_path, s3_server, s3_bucket):
    local = AppConfig(home=tmp_path)
    assert isinstance(open_artifact_store(local), LocalArtifactStore)
    assert local.resolved_artifacts_dir == tmp_path / "artifacts"
    on_s3 = AppConfig(home=tmp_path, artifacts=f"s3://{s3_bucket}/out", s3={"endpoint_url": s3_server})
    store = open_artifact_store(on_s3)
    assert isinstance(store, S3ArtifactStore) and (store.bucket, store.prefix) == (s3_bucket, "out")
    with pytest.raises(ValueError, match="not in a local directory"):
        on_s3.resolved_artifacts_dir
    for field, value, match in [
        ("artifacts", "gs://bucket/out", "scheme 'gs'"),
        ("artifacts", "s3:///out", "no bucket"),
        ("home", "s3://bucket/home", "home must be a local directory"),
        ("artifacts_dir", "s3://bucket/out", "artifacts_dir"),  # the old path-typed field is gone, not reinterpreted
    ]:
        with pytest.raises(ValidationError, match=match):
            AppConfig.model_validate({"home": str(tmp_path), field: value})
    with pytest.raises(ValidationError, match="presigned_url_ttl_s"):
        AppConfig(home=tmp_path, s3={"presigned_url_ttl_s": 8 * 24 * 3600})


def test_a_done_job_on_s3_has_a_presigned_url_and_content_streams(tmp_path, s3_server, s3_bucket):
    from fastapi.testclient import TestClient

    from imagine.api.routes import create_api
    from imagine.api.schemas import GenerationRequest
    from imagine.api.service import JobService
    from imagine.jobs import JobStore
    from imagine.models.presets import get_preset
    from imagine.storage import output_video_key

    config = AppConfig(home=tmp_path, auth={"enabled": False}, artifacts=f"s3://{s3_bucket}/imagine",
                       s3={"endpoint_url": s3_server, "presigned_url_ttl_s": 600})
    store = JobStore(config.resolved_database_url)
    service = JobService(config, store, open_artifact_store(config), {"tiny": get_preset("tiny")}, "tiny")
    client = TestClient(create_api(service), raise_server_exceptions=False)
    job = service.create("generation", GenerationRequest(prompt="a fox", duration=1)).job
    claimed = store.claim(job.id)
    video = bytes(range(256)) * 40
    service.artifacts.put_bytes(output_video_key(job.tenant, job.id), video)
    store.complete(job.id, claimed.attempt, {
        "artifact_key": output_video_key(job.tenant, job.id), "bytes": len(video), "duration_s": 1.0, "width": 864, "height": 480,
        "fps": 24.0, "num_frames": 25, "audio_duration_s": 1.0, "has_audio": True, "stage_seconds": {},
    })
    before = time.time()
    body = client.get(f"/v1/videos/{job.id}").json()
    assert body["video"]["url"].startswith(f"{s3_server}/{s3_bucket}/imagine/outputs/default/{job.id}/video.mp4?")
    assert before + 600 - 5 <= body["video"]["expires_at"] <= time.time() + 600
    assert httpx.get(body["video"]["url"]).content == video  # no API key
    assert parse_qs(urlparse(body["video"]["url"]).query)["X-Amz-Expires"] == ["600"]
    ranged = client.get(f"/v1/videos/{job.id}/content", headers={"Range": "bytes=100-199"})
    assert ranged.status_code == 206 and ranged.content == video[100:200]
    assert client.get(f"/v1/videos/{job.id}/content").content == video
    service.artifacts.delete(output_video_key(job.tenant, job.id))
    gone = client.get(f"/v1/videos/{job.id}/content")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "content_gone"
    store.close()
