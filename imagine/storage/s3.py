"""Artifact store on S3 (or any S3-compatible server): no replica needs a shared disk.

Keys live under `s3://bucket/prefix/`. Credentials and region come from boto3's standard chain (environment, shared
config, instance / pod identity); `endpoint_url` points at an S3-compatible server. Writes are atomic from a reader's
view: S3 makes an object visible only once its PUT, or the completion of its multipart upload, has succeeded, so a
reader never sees a partial artifact. Large files go up in parts (`multipart_threshold`), in parallel.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from imagine.storage.base import ArtifactNotFound, ArtifactStore, check_key

MAX_PRESIGN_S = 7 * 24 * 3600  # SigV4's limit for presigned URLs


def parse_s3_uri(uri: str, field: str = "artifacts") -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); ValueError naming `field` and the URI otherwise.
    The one parser of s3:// locations (artifact stores, model sources); no boto3 needed."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{field}: expected an s3:// URI, got {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{field}: S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


class S3ArtifactStore(ArtifactStore):
    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold: int = 64 * 2**20,
        client: Any = None,
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        if multipart_threshold < 5 * 2**20:
            raise ValueError(f"multipart_threshold must be >= 5 MiB (S3's smallest part), got {multipart_threshold}")
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(signature_version="s3v4", retries={"mode": "standard", "max_attempts": 5}),
        )
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_threshold)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, error: Exception) -> bool:
        from botocore.exceptions import ClientError

        if not isinstance(error, ClientError):
            return False
        return error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")

    def put_file(self, key: str, source: Path) -> int:
        self.client.upload_file(str(source), self.bucket, self._key(key), Config=self.transfer)
        return Path(source).stat().st_size

    def put_bytes(self, key: str, data: bytes) -> int:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        return len(data)

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as e:
            if self._missing(e):
                raise ArtifactNotFound(key) from e
            raise

    def _get(self, key: str, byte_range: str | None = None) -> Any:
        kwargs = {"Range": byte_range} if byte_range else {}
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)["Body"]
        except Exception as e:
            if self._missing(e):
                raise ArtifactNotFound(key) from e
            raise

    def open(self, key: str) -> BinaryIO:
        """The whole object in memory, seekable (artifacts that are opened whole are inputs and checkpoints, a few
        MB; videos are served by `iter_range`, which streams)."""
        body = self._get(key)
        try:
            return io.BytesIO(body.read())
        finally:
            body.close()

    def iter_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """Bytes [start, end] inclusive, streamed from one ranged GET."""
        body = self._get(key, f"bytes={start}-{end}")
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))  # idempotent: S3 answers 204 either way

    def delete_many(self, keys: list[str]) -> None:
        """One DeleteObjects request per 1000 keys (S3's limit); absent keys count as deleted."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            answer = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = answer.get("Errors") or []
            if errors:
                raise RuntimeError(f"S3 could not delete {len(errors)} objects, e.g. {errors[0]}")

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A GET URL for `key` that works without credentials until `expires_s` seconds from now."""
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be in [1, {MAX_PRESIGN_S}] (7 days), got {expires_s}")
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )
