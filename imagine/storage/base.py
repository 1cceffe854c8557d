"""The artifact-store interface: keys are '/'-separated paths scoped by the caller (e.g. per job)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterator


class ArtifactNotFound(KeyError):
    """No artifact under this key."""


class ArtifactStore(ABC):
    """Put whole files, read byte ranges back. Implementations: local directory (here), S3 (later)."""

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

    def read_bytes(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()
