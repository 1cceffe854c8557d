"""Artifact stores: where finished MP4s (and uploaded inputs) live, and the key layout inside them (`keys`)."""

from imagine.storage.base import ArtifactNotFound, ArtifactStore
from imagine.storage.keys import (
    checkpoint_key,
    grounded_masks_key,
    input_image_key,
    input_mask_key,
    input_source_key,
    output_video_key,
)
from imagine.storage.local import LocalArtifactStore

__all__ = [
    "ArtifactNotFound",
    "ArtifactStore",
    "LocalArtifactStore",
    "checkpoint_key",
    "grounded_masks_key",
    "input_image_key",
    "input_mask_key",
    "input_source_key",
    "open_artifact_store",
    "output_video_key",
]


def open_artifact_store(location: str) -> ArtifactStore:
    """The store for a location: a local directory today; `s3://` joins with the S3 store."""
    if location.startswith("s3://"):
        raise ValueError(f"artifact location {location!r}: the S3 artifact store is not available yet")
    return LocalArtifactStore(location)
