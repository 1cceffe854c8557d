"""Artifact stores: where finished MP4s (and uploaded inputs) live, and the key layout inside them (`keys`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from imagine.config import AppConfig

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


def open_artifact_store(config: AppConfig) -> ArtifactStore:
    """The configured store: `config.artifacts` is `s3://bucket/prefix` (the S3 store, `config.s3`'s options) or a
    local directory (default `<home>/artifacts`)."""
    if config.artifacts_on_s3:
        from imagine.storage.s3 import S3ArtifactStore

        s3 = config.s3
        return S3ArtifactStore(
            config.resolved_artifacts, endpoint_url=s3.endpoint_url, region=s3.region,
            multipart_threshold=s3.multipart_threshold_mib * 2**20,
        )
    return LocalArtifactStore(config.resolved_artifacts_dir)
