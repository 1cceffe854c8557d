"""Read a source video for editing, and write the edited frames back with the source's audio, untouched.

An edit repaints pixels only, so the output keeps the source's frame count, frame rate and size, and its audio
stream is stream-copied (the compressed packets, byte for byte, no decode/re-encode generation loss). Anything
that cannot be read as a video raises `MediaError`, a `ValueError` the API maps to a 4xx.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import torch

from imagine.pipeline.mux import X264_PRESETS, MuxInfo, add_h264_stream, check_rgb_frames, encode_frames

# x264 CRF for edited videos: high enough quality that the re-encoded source pixels outside the mask lose well under
# 1 dB PSNR against a plain re-encode (see tests/test_edit_stage.py). Measured on its scene over 3 seeds: a gap of
# 0.6-1.0 dB at CRF 12 (the macroblocks that straddle the mask edge share the repainted pixels' quantization and
# deblocking), 0.4-0.6 dB at CRF 8; so 8, at a larger file.
EDIT_CRF = 8


class MediaError(ValueError):
    """The data is not a video this service can read or write (undecodable, no video stream, unsupported)."""


class MediaTooLargeError(MediaError):
    """The video has more frames than the caller allows (the API maps it to 413)."""


@dataclass(frozen=True)
class AudioStreamInfo:
    """The source's first audio stream, as it will be copied into the edited MP4."""

    codec: str
    sample_rate: int
    channels: int
    duration_s: float | None
    mp4_copyable: bool
    """Whether the MP4 muxer accepts this codec as is; if not, `remux_with_source_audio` refuses the source."""


@dataclass
class SourceVideo:
    """A decoded source video plus what is needed to copy its audio into an edited version."""

    frames: torch.Tensor
    """uint8 (F, H, W, 3), RGB."""
    frame_rate: Fraction
    """Exact average frame rate from the container (e.g. 30000/1001); `fps` is its float value."""
    audio: AudioStreamInfo | None
    source: bytes | Path
    """The encoded source itself (bytes) or its path: its audio packets are re-read from here when remuxing."""

    @property
    def fps(self) -> float:
        return float(self.frame_rate)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    @property
    def has_audio(self) -> bool:
        return self.audio is not None


@dataclass(frozen=True)
class RemuxInfo(MuxInfo):
    """What `remux_with_source_audio` wrote; `has_audio`: the source had audio and its packets were copied."""

    has_audio: bool = False


@functools.cache
def _mp4_codecs() -> frozenset[str]:
    """Codec names the MP4 muxer accepts (asked from FFmpeg once; an unwritten in-memory container is enough)."""
    container = av.open(io.BytesIO(), mode="w", format="mp4")
    try:
        return frozenset(container.supported_codecs)
    finally:
        container.close()


def mp4_accepts(codec: str) -> bool:
    """Whether an MP4 can carry a stream of this FFmpeg codec as is (so its packets can be copied)."""
    return codec in _mp4_codecs()


def _open_input(src: bytes | Path, param: str) -> av.container.InputContainer:
    try:
        return av.open(io.BytesIO(src) if isinstance(src, bytes) else str(src), mode="r")
    except av.error.FFmpegError as e:
        raise MediaError(f"{param}: not a readable video container ({e})") from e


def _frame_rate(stream: av.VideoStream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise MediaError("src: the video stream has no frame rate")
    return Fraction(rate.numerator, rate.denominator)


def read_video(src: str | os.PathLike | bytes, max_frames: int | None = None) -> SourceVideo:
    """Decode every frame of `src` (a path or the file's bytes) to RGB and describe its first audio stream.

    Raises `MediaError` for data FFmpeg cannot open or decode, or without a video stream or any decodable frame,
    and `MediaTooLargeError` past `max_frames` (checked while decoding, so a huge upload is not fully decoded).
    Rotation metadata is not applied and variable-frame-rate sources are treated as constant at their average rate.
    """
    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
    if isinstance(src, (bytes, bytearray, memoryview)):
        source: bytes | Path = bytes(src)
        if not source:
            raise MediaError("src: empty data is not a video")
    elif isinstance(src, (str, os.PathLike)):
        source = Path(src)
        if not source.is_file():
            raise MediaError(f"src: {str(source)!r} is not a file")
    else:
        raise TypeError(f"src must be a path or bytes, got {type(src).__name__}")

    frames: list[np.ndarray] = []
    with _open_input(source, "src") as container:
        if not container.streams.video:
            raise MediaError("src: the file has no video stream")
        stream = container.streams.video[0]
        frame_rate = _frame_rate(stream)
        audio = None
        if container.streams.audio:
            audio_stream = container.streams.audio[0]
            ctx = audio_stream.codec_context
            audio = AudioStreamInfo(
                codec=ctx.name,
                sample_rate=int(ctx.sample_rate),
                channels=int(ctx.channels),
                duration_s=(float(audio_stream.duration * audio_stream.time_base) if audio_stream.duration else None),
                mp4_copyable=mp4_accepts(ctx.name),
            )
        width, height = stream.codec_context.width, stream.codec_context.height
        try:
            for frame in container.decode(stream):
                if max_frames is not None and len(frames) >= max_frames:
                    raise MediaTooLargeError(f"src: the video has more than max_frames={max_frames} frames")
                # every frame at the stream's size, so a mid-stream size change cannot break stacking
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
        except av.error.FFmpegError as e:
            raise MediaError(f"src: the video stream cannot be decoded ({e})") from e
    if not frames:
        raise MediaError("src: the video stream has no decodable frame")
    return SourceVideo(frames=torch.from_numpy(np.stack(frames)), frame_rate=frame_rate, audio=audio, source=source)


def remux_with_source_audio(
    frames: torch.Tensor | np.ndarray,
    fps: float | Fraction,
    source: SourceVideo | str | os.PathLike | bytes,
    out: str | os.PathLike | BinaryIO,
    crf: int = EDIT_CRF,
    preset: str = "veryfast",
) -> RemuxInfo:
    """Write `frames` (uint8 (F, H, W, 3)) as H.264 yuv420p at `fps`, plus the first audio stream of `source` (a
    `SourceVideo`, or the source file's path or bytes) copied packet for packet, without re-encoding, to an MP4 path
    (with faststart) or a seekable binary file object. A source without audio gives a video-only MP4.

    Pass `source.frame_rate` as `fps` to keep an exact NTSC-style rate (a float is rounded to a denominator <= 1001).
    Raises `MediaError` when the source's audio codec cannot be stored in an MP4 (see `AudioStreamInfo.mp4_copyable`).
    """
    array = check_rgb_frames(frames, size_error=MediaError)
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    if preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {X264_PRESETS}, got {preset!r}")
    frame_rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if not frame_rate > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if isinstance(source, SourceVideo):
        encoded: bytes | Path = source.source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        encoded = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        encoded = Path(source)
    else:
        raise TypeError(f"source must be a SourceVideo, a path or bytes, got {type(source).__name__}")

    is_file_object = hasattr(out, "write")
    start = out.tell() if is_file_object else 0
    # faststart (index first, for progressive playback) rewrites the file by name, so only for paths
    options = {} if is_file_object else {"movflags": "+faststart"}
    container = av.open(out if is_file_object else str(out), mode="w", format="mp4", options=options)
    num_frames, height, width = array.shape[:3]
    try:
        with _open_input(encoded, "source") as src_container:
            src_audio = src_container.streams.audio[0] if src_container.streams.audio else None
            out_audio = None
            audio_duration_s = 0.0
            if src_audio is not None:
                try:
                    out_audio = container.add_stream_from_template(src_audio)
                except ValueError as e:  # the MP4 muxer refuses the codec
                    raise MediaError(
                        f"source: its audio codec {src_audio.codec_context.name!r} cannot be copied into an MP4"
                    ) from e
            # every stream must exist before the first packet is written
            video_stream = add_h264_stream(container, width, height, frame_rate, crf, preset)
            if src_audio is not None:
                if src_audio.duration:
                    audio_duration_s = float(src_audio.duration * src_audio.time_base)
                for packet in src_container.demux(src_audio):
                    if packet.dts is None:  # the demuxer's end-of-stream marker, not data
                        continue
                    packet.stream = out_audio
                    container.mux(packet)
        encode_frames(container, video_stream, array)
    finally:
        container.close()

    if is_file_object:
        out.seek(0, io.SEEK_END)
        size = out.tell() - start
    else:
        size = Path(out).stat().st_size
    return RemuxInfo(
        duration_s=num_frames / float(frame_rate),
        width=width,
        height=height,
        fps=float(frame_rate),
        num_frames=num_frames,
        audio_duration_s=audio_duration_s,
        bytes=size,
        has_audio=out_audio is not None,
    )
