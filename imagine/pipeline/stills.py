"""JPEG stills of a finished clip, made from its decoded frames as the video is stored: a `thumbnail` (the middle frame,
at most 640 px wide) and a `spritesheet` (frames evenly across the clip, 160 px wide each, in a grid) -- what
OpenAI's `download_content(variant=...)` serves and a player shows while scrubbing. Small: tens of KB."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

THUMBNAIL_MAX_WIDTH = 640
SPRITE_WIDTH = 160
SPRITE_COLUMNS = 5
SPRITE_FRAMES = 10
JPEG_QUALITY = 85


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _resized(frame: np.ndarray, width: int) -> Image.Image:
    image = Image.fromarray(frame)
    if image.width > width:
        image = image.resize((width, max(1, round(image.height * width / image.width))), Image.Resampling.LANCZOS)
    return image


def _check(frames) -> np.ndarray:
    if hasattr(frames, "numpy"):  # a CPU torch tensor (the edit decoder's frames)
        frames = frames.numpy()
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {getattr(frames, 'shape', type(frames).__name__)}")
    if frames.shape[0] == 0:
        raise ValueError("frames must not be empty")
    return frames


def thumbnail_jpeg(frames: np.ndarray) -> bytes:
    """The middle frame as a JPEG, at most `THUMBNAIL_MAX_WIDTH` px wide."""
    frames = _check(frames)
    return _jpeg(_resized(frames[len(frames) // 2], THUMBNAIL_MAX_WIDTH))


def sprite_indices(num_frames: int, count: int = SPRITE_FRAMES) -> list[int]:
    """`count` frame indices evenly across the clip (each at the middle of its share); fewer for a shorter clip."""
    count = min(count, num_frames)
    return [int((k + 0.5) * num_frames / count) for k in range(count)]


def spritesheet_jpeg(frames: np.ndarray, count: int = SPRITE_FRAMES, columns: int = SPRITE_COLUMNS) -> bytes:
    """`count` frames evenly across the clip, `SPRITE_WIDTH` px wide each, row by row in a grid of `columns`."""
    frames = _check(frames)
    tiles = [_resized(frames[i], SPRITE_WIDTH) for i in sprite_indices(len(frames), count)]
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    width, height = tiles[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for k, tile in enumerate(tiles):
        sheet.paste(tile, ((k % columns) * width, (k // columns) * height))
    return _jpeg(sheet)


def still_key(video_key: str, variant: str) -> str:
    """Where a still of the video stored at `video_key` goes: beside it (`.../thumbnail.jpg`)."""
    return f"{video_key.rsplit('/', 1)[0]}/{variant}.jpg"


def store_stills(artifacts, video_key: str, frames: np.ndarray) -> dict[str, str]:
    """Make and store both stills beside the video; returns {variant: key} (a result's `artifact_keys`, which
    retention deletes with the video)."""
    keys = {}
    for variant, make in (("thumbnail", thumbnail_jpeg), ("spritesheet", spritesheet_jpeg)):
        keys[variant] = still_key(video_key, variant)
        artifacts.put_bytes(keys[variant], make(frames))
    return keys
