"""Intake of `POST /v1/videos/edits`: the source video (a done job of the caller, or an uploaded data URI),
the explicit mask, and the instruction, all validated before anything is stored; every failure is an `ApiError`
naming the field. Frames are never decoded here beyond the first (the editor replica decodes the clip)."""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import av

from imagine.api.errors import ApiError
from imagine.api.schemas import Box, EditRequest, MaskSpec
from imagine.config import EditConfig
from imagine.pipeline.media import mp4_accepts

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


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


def decode_video_data_uri(value: str, field: str, max_bytes: int) -> bytes:
    """A `data:video/...;base64,` URI -> its bytes (400/413 naming `field`)."""
    if not value.startswith("data:"):
        raise ApiError(
            400, "unsupported_video_url",
            f"{field} must be a data URI (data:video/mp4;base64,...); remote URLs are not fetched yet", field,
        )
    match = _DATA_URI.match(value)
    if match is None or not match.group("b64"):
        raise ApiError(400, "invalid_video_url", f"{field} is not a base64 data URI", field)
    mime = match.group("mime")
    if mime and not (mime.startswith("video/") or mime == "application/octet-stream"):
        raise ApiError(400, "invalid_video_url", f"{field} has media type {mime!r}, not video/*", field)
    payload = match.group("data")
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, "video_too_large", f"{field} is larger than {max_bytes} bytes", field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "invalid_video_url", f"{field} has invalid base64: {e}", field) from e


def probe_video(data: bytes, field: str) -> SourceInfo:
    """Open `data` as a video container, decode its first frame, count its frames (packets, no decode)."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ApiError(400, "invalid_video", f"{field} has no video stream", field)
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            has_audio = bool(container.streams.audio)
            audio_codec = container.streams.audio[0].codec_context.name if has_audio else None
            first = next(container.decode(video=0), None)
            if first is None:
                raise ApiError(400, "invalid_video", f"{field} has no decodable video frame", field)
            width, height = first.width, first.height
            container.seek(0)
            frames = sum(1 for p in container.demux(video=0) if p.size > 0)
    except ApiError:
        raise
    except (av.FFmpegError, ValueError, StopIteration, OSError) as e:
        raise ApiError(400, "invalid_video", f"{field} could not be decoded as a video: {e}", field) from e
    if not rate or frames < 1:
        raise ApiError(400, "invalid_video", f"{field} has no frame rate or no frames", field)
    # what the editor could only find out after the repaint: the output keeps the size (H.264 4:2:0 needs it even)
    # and copies the audio packets (the MP4 muxer must accept the codec)
    if width % 2 or height % 2:
        raise ApiError(
            422, "unsupported_video", f"{field} is {width}x{height}; edits need an even width and height", field
        )
    if audio_codec is not None and not mp4_accepts(audio_codec):
        raise ApiError(
            422, "unsupported_video", f"{field} has {audio_codec!r} audio, which an MP4 cannot carry; use AAC", field
        )
    fps = float(rate)
    return SourceInfo(width, height, frames, fps, frames / fps, has_audio)


def check_source_limits(info: SourceInfo, field: str, config: EditConfig) -> None:
    if info.duration_s > config.max_source_s + 1e-6:
        raise ApiError(
            422, "video_too_long", f"{field} is {info.duration_s:.2f} s; edits accept at most {config.max_source_s:g} s",
            field,
        )
    if info.width * info.height > config.max_source_pixels:
        raise ApiError(
            422, "video_too_large", f"{field} is {info.width}x{info.height}, over {config.max_source_pixels} pixels",
            field,
        )
    if info.width < 16 or info.height < 16:
        raise ApiError(422, "video_too_small", f"{field} is {info.width}x{info.height}; at least 16x16", field)


def _check_box(box: Box, field: str, width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ApiError(
            422, "invalid_mask",
            f"{field} = {list(box)} must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
            "(source pixels)", field,
        )
    return [float(v) for v in box]


def check_mask(mask: MaskSpec, info: SourceInfo, max_bytes: int) -> tuple[dict[str, Any], bytes | None]:
    """Validate an explicit mask against the source; returns (the stored mask params, mask video bytes or None)."""
    if mask.boxes is not None:
        return {"boxes": [_check_box(b, f"mask.boxes[{i}]", info.width, info.height) for i, b in enumerate(mask.boxes)]}, None
    if mask.frames is not None:
        frames: dict[str, list[list[float]]] = {}
        for index, boxes in mask.frames.items():
            if not 0 <= index < info.num_frames:
                raise ApiError(
                    422, "invalid_mask", f"mask.frames key {index} is not a frame of the source (0..{info.num_frames - 1})",
                    f"mask.frames.{index}",
                )
            frames[str(index)] = [
                _check_box(b, f"mask.frames.{index}[{i}]", info.width, info.height) for i, b in enumerate(boxes)
            ]
        if not any(frames.values()):
            raise ApiError(422, "invalid_mask", "mask.frames has no boxes", "mask.frames")
        return {"frames": frames}, None
    data = decode_video_data_uri(mask.video_url, "mask.video_url", max_bytes)
    minfo = probe_video(data, "mask.video_url")
    if (minfo.width, minfo.height, minfo.num_frames) != (info.width, info.height, info.num_frames):
        raise ApiError(
            422, "invalid_mask",
            f"mask.video_url is {minfo.width}x{minfo.height} with {minfo.num_frames} frames; the source is "
            f"{info.width}x{info.height} with {info.num_frames}", "mask.video_url",
        )
    return {"video": True}, data


def instruction_params(req: EditRequest) -> dict[str, Any]:
    """The parsed instruction as stored params. Without an explicit mask it must parse (422 showing the accepted
    forms); with one, free text is fine: it becomes the repaint prompt of that region."""
    from imagine.pipeline.instructions import InstructionError, parse_instruction

    try:
        parsed = parse_instruction(req.prompt)
    except InstructionError as e:
        if req.mask is None:
            raise ApiError(422, "unparseable_instruction", str(e), "prompt") from e
        return {"op": "inpaint", "target": None, "replacement": req.prompt, "place": None, "language": None}
    data = asdict(parsed) if is_dataclass(parsed) else parsed.model_dump()
    return data
