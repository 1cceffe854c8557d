"""The edit-specific checks of `POST /v1/videos/edits`: the source video's limits (a done job of the caller, or an
upload decoded by `imagine.api.intake`), the explicit mask, and the instruction, all validated before anything is
stored; every failure is an `ApiError` naming the field. Frames are never decoded here beyond the first (the editor
replica decodes the clip). Imports PyAV: the service loads this module on the first edit, not at ingress start."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from imagine.api.errors import ApiError
from imagine.api.intake import decode_video
from imagine.api.schemas import Box, EditRequest, MaskSpec
from imagine.config import EditConfig
from imagine.jobs.params import EditInstruction, EditMask
from imagine.pipeline.media import MediaError, MediaInfo, MediaTooLargeError, mp4_accepts, probe

DEFAULT_MAX_MASK_BOXES: int = EditConfig.model_fields["max_mask_boxes"].default


@dataclass(frozen=True)
class SourceInfo:
    """What the editor must reproduce: the source's size, frame count, rate and duration."""

    width: int
    height: int
    num_frames: int
    fps: float
    duration_s: float
    has_audio: bool

    @property
    def resolution(self) -> str:
        """The price-list class of the clip (by its short side)."""
        return "480p" if min(self.width, self.height) <= 480 else "720p"


def max_source_frames(config: EditConfig) -> int:
    """The most frames a source may have: `config.max_source_frames`, or `max_source_s` at `max_source_fps`."""
    if config.max_source_frames is not None:
        return config.max_source_frames
    return math.floor(config.max_source_s * config.max_source_fps + 1e-6)


def _read_info(data: bytes, field: str, max_frames: int | None, max_pixels: int | None) -> MediaInfo:
    """`media.probe` of an upload, bounded; 400 when it cannot be read as a video (`MediaTooLargeError` passes)."""
    try:
        return probe(data, max_frames=max_frames, max_pixels=max_pixels)
    except MediaTooLargeError:
        raise
    except MediaError as e:
        raise ApiError(400, "invalid_video", f"{field} could not be decoded as a video: {e}", field) from e


def probe_video(
    data: bytes, field: str, *, max_frames: int | None = None, max_pixels: int | None = None
) -> SourceInfo:
    """What the editor must reproduce of the video in `data` (`media.probe`: its first frame decoded, its frames
    counted as packets); 400 when it cannot be read as a video, 422 when an edit could not write it back or it is
    past `max_frames` (counting stops there: pass `max_source_frames(config)`) or `max_pixels` (checked before the
    first frame is decoded: pass `config.max_source_pixels`)."""
    try:
        info = _read_info(data, field, max_frames, max_pixels)
    except MediaTooLargeError as e:
        raise ApiError(422, "video_too_large", f"{field} is too large for an edit: {e}", field) from e
    # what the editor could only find out after the repaint: the output keeps the size (H.264 4:2:0 needs it even)
    # and copies the audio packets (the MP4 muxer must accept the codec)
    if info.width % 2 or info.height % 2:
        raise ApiError(
            422, "unsupported_video", f"{field} is {info.width}x{info.height}; edits need an even width and height",
            field,
        )
    if info.audio_codec is not None and not mp4_accepts(info.audio_codec):
        raise ApiError(
            422, "unsupported_video", f"{field} has {info.audio_codec!r} audio, which an MP4 cannot carry; use AAC",
            field,
        )
    return SourceInfo(info.width, info.height, info.num_frames, info.fps, info.duration_s, info.has_audio)


def check_source_limits(info: SourceInfo, field: str, config: EditConfig) -> None:
    """The source's duration, frame rate, frame count and size against `config` (422 naming `field`)."""
    if info.duration_s > config.max_source_s + 1e-6:
        raise ApiError(
            422, "video_too_long", f"{field} is {info.duration_s:.2f} s; edits accept at most {config.max_source_s:g} s",
            field,
        )
    if info.fps > config.max_source_fps + 1e-6:
        raise ApiError(
            422, "unsupported_video", f"{field} is {info.fps:g} fps; edits accept at most {config.max_source_fps:g} fps",
            field,
        )
    max_frames = max_source_frames(config)
    if info.num_frames > max_frames:
        raise ApiError(
            422, "video_too_large", f"{field} has {info.num_frames} frames; edits accept at most {max_frames}", field
        )
    if info.width * info.height > config.max_source_pixels:
        raise ApiError(
            422, "video_too_large", f"{field} is {info.width}x{info.height}, over {config.max_source_pixels} pixels",
            field,
        )
    if info.width < 16 or info.height < 16:
        raise ApiError(422, "video_too_small", f"{field} is {info.width}x{info.height}; at least 16x16", field)


def _check_box_count(count: int, field: str, max_boxes: int) -> None:
    if count > max_boxes:
        raise ApiError(422, "mask_too_large", f"{field} has {count} boxes; a mask has at most {max_boxes}", field)


def _check_box(box: Box, field: str, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ApiError(
            422, "invalid_mask",
            f"{field} = {list(box)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
            "(source pixels)", field,
        )
    return [float(v) for v in box]


def check_mask(
    mask: MaskSpec, info: SourceInfo, max_bytes: int, max_boxes: int = DEFAULT_MAX_MASK_BOXES, remote: Any = None
) -> tuple[EditMask, bytes | None]:
    """Validate an explicit mask against the source; returns (the job's mask, the mask video's bytes or None).
    Boxes are counted (at most `max_boxes` in all: pass `config.max_mask_boxes`) before any is checked; a mask video
    is counted only up to the source's frames and checked against its size before a frame is decoded."""
    if mask.boxes is not None:
        _check_box_count(len(mask.boxes), "mask.boxes", max_boxes)
        boxes = [_check_box(b, f"mask.boxes[{i}]", info.width, info.height) for i, b in enumerate(mask.boxes)]
        return EditMask(boxes=boxes), None
    if mask.frames is not None:
        _check_box_count(sum(len(boxes) for boxes in mask.frames.values()), "mask.frames", max_boxes)
        frames: dict[int, list[list[float]]] = {}
        for index, boxes in mask.frames.items():
            if not 0 <= index < info.num_frames:
                raise ApiError(
                    422, "invalid_mask", f"mask.frames key {index} is not a frame of the source (0..{info.num_frames - 1})",
                    f"mask.frames.{index}",
                )
            frames[index] = [
                _check_box(b, f"mask.frames.{index}[{i}]", info.width, info.height) for i, b in enumerate(boxes)
            ]
        if not any(frames.values()):
            raise ApiError(422, "invalid_mask", "mask.frames has no boxes", "mask.frames")
        return EditMask(frames=frames), None
    data = decode_video(mask.video_url, "mask.video_url", max_bytes, remote)
    try:
        minfo = _read_info(data, "mask.video_url", info.num_frames, info.width * info.height)
    except MediaTooLargeError as e:
        raise ApiError(
            422, "invalid_mask", f"mask.video_url is larger than the source ({info.width}x{info.height} with "
            f"{info.num_frames} frames): {e}", "mask.video_url",
        ) from e
    if (minfo.width, minfo.height, minfo.num_frames) != (info.width, info.height, info.num_frames):
        raise ApiError(
            422, "invalid_mask",
            f"mask.video_url is {minfo.width}x{minfo.height} with {minfo.num_frames} frames; the source is "
            f"{info.width}x{info.height} with {info.num_frames}", "mask.video_url",
        )
    return EditMask(video=True), data


def edit_instruction(req: EditRequest) -> EditInstruction:
    """The parsed instruction of the job. Without an explicit mask it must parse (422 showing the accepted forms);
    with one, free text is fine: it becomes the repaint prompt of that region (op `inpaint`)."""
    from imagine.editing.instructions import InstructionError, parse_instruction

    try:
        parsed = parse_instruction(req.prompt)
    except InstructionError as e:
        if req.mask is None:
            raise ApiError(422, "unparseable_instruction", str(e), "prompt") from e
        return EditInstruction(op="inpaint", replacement=req.prompt)
    return EditInstruction.model_validate(parsed, from_attributes=True)
