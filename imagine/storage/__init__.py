"""Artifact stores: where finished MP4s (and uploaded inputs) live."""

from imagine.storage.base import ArtifactNotFound, ArtifactStore
from imagine.storage.local import LocalArtifactStore

__all__ = ["ArtifactNotFound", "ArtifactStore", "LocalArtifactStore", "open_artifact_store"]


def open_artifact_store(location: str) -> ArtifactStore:
    """The store for a location: a local directory today; `s3://` joins with the S3 store."""
    if location.startswith("s3://"):
        raise ValueError(f"artifact location {location!r}: the S3 artifact store is not available yet")
    return LocalArtifactStore(location)
