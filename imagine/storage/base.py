"""The artifact-store interface: keys are '/'-separated paths scoped by the caller (e.g. per job)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterator


class ArtifactNotFound(KeyError):
    """No artifact under this key."""


def check_key(key: str) -> str:
    """`key` if it is a relative '/'-separated path with no empty, '.' or '..' part; ValueError otherwise (the same
    keys are valid in every store)."""
    parts = key.split("/") if isinstance(key, str) else [""]
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid artifact key {key!r}")
    return key


class ArtifactStore(ABC):
    """Put whole files, read byte ranges back. Implementations: a local directory (`local`), S3 (`s3`)."""

    @abstractmethod
    def put_file(self, key: str, source: Path) -> int:
        """Store a local file under `key` (atomically: readers never see a partial file); returns its size."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> int:
        """Store bytes under `key`; returns the size."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes; raises ArtifactNotFound."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A binary file object positioned at 0; raises ArtifactNotFound."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key` if present."""

    def delete_many(self, keys: list[str]) -> None:
        """Remove every key that is present (idempotent)."""
        for key in keys:
            self.delete(key)

    def iter_range(self, key: str, start: int, end: int, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        """Bytes [start, end] inclusive, in chunks (HTTP Range semantics)."""
        with self.open(key) as fh:
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = fh.read(min(chunk_size, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL that downloads `key` without the API's credentials for `expires_s` seconds, where the store can
        make one (S3); None where it cannot (a local directory: clients use the API's content route)."""
        return None

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()
