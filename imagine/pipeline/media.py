"""Video files in and out, with PyAV: `probe` (what a file holds, decoding one frame), `read_video` (every frame),
`mux_mp4` (generated frames + audio -> H.264 yuv420p + AAC MP4) and `remux_with_source_audio` (edited frames +
the source's audio packets, copied). All four describe the file with one `MediaInfo`.

An edit repaints pixels only, so its output keeps the source's frame count, frame rate and size, and its audio
stream is stream-copied (the compressed packets, byte for byte, no decode/re-encode generation loss). Anything
that cannot be read or written as a video raises `MediaError`, a `ValueError` the API maps to a 4xx.

Inputs may be uploads, so every open is confined: the container is recognised by its magic bytes (ISO-BMFF/QuickTime
or Matroska/WebM, nothing else) and that one demuxer is forced; FFmpeg reads a Python file object (never a URL or a
path string) with no protocol allowed for nested opens, bounded probing and an I/O timeout. An SDP, HLS or ffconcat
text is refused before FFmpeg sees it, so no socket or local file is ever opened on an upload's behalf.

torch is imported only inside `read_video` (its frames are a tensor): the HTTP ingress probes uploads with this
module and never loads torch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import av
import numpy as np

if TYPE_CHECKING:
    import torch

    from imagine.pipeline.types import DecodedMedia

AUDIO_CHUNK = 1024  # samples per AAC frame
OPEN_TIMEOUT_S = 10.0  # FFmpeg's I/O interrupt: no single open or read of an input may block for longer
PROBE_BYTES = 5_000_000  # FFmpeg's probesize: bytes read to find the streams (its default, made explicit)
PROBE_US = 5_000_000  # FFmpeg's analyzeduration: microseconds of media read to find the streams
_QUICKTIME_BOXES = frozenset((b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"))  # a first box at offset 4
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
# Options of every input: nested opens (HLS segments, concat entries, RTP sessions, reference movies) would go
# through protocols, and none is allowed; only the two accepted demuxers may run.
_DEMUXER_OPTIONS = {
    "protocol_whitelist": "",
    "format_whitelist": "mov,matroska",
    "probesize": str(PROBE_BYTES),
    "analyzeduration": str(PROBE_US),
}
_PRIVATE_OPTIONS = {"mov": {"enable_drefs": "0", "use_absolute_path": "0"}, "matroska": {}}
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


class MediaError(ValueError):
    """The data is not a video this service can read or write (undecodable, no video stream, unsupported)."""


class MediaTooLargeError(MediaError):
    """The video has more frames than the caller allows (the API maps it to 413)."""


@dataclass(frozen=True)
class MediaInfo:
    """A video file's streams: as `probe` / `read_video` found them, or as `mux_mp4` / `remux_with_source_audio`
    wrote them. Only the first video and the first audio stream count."""

    width: int
    height: int
    frame_rate: Fraction
    """Exact average frame rate (e.g. 30000/1001); `fps` is its float value."""
    num_frames: int
    """Frames of the video stream (`probe` counts its packets, the readers and writers their frames)."""
    video_codec: str
    """FFmpeg codec name, e.g. 'h264'."""
    pix_fmt: str | None
    audio_codec: str | None
    """FFmpeg codec name of the first audio stream, e.g. 'aac'; None without audio."""
    sample_rate: int | None
    audio_channels: int | None
    audio_duration_s: float | None
    """0.0 without audio; None when the audio stream does not record its duration."""
    bytes: int
    """Size of the whole file."""

    @property
    def fps(self) -> float:
        return float(self.frame_rate)

    @property
    def duration_s(self) -> float:
        """The video's duration: `num_frames` at `frame_rate` (sources are treated as constant-frame-rate)."""
        return self.num_frames / self.fps

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


@dataclass
class SourceVideo:
    """A decoded source video plus what is needed to copy its audio into an edited version. The properties are
    its `info`'s."""

    frames: torch.Tensor
    """uint8 (F, H, W, 3), RGB."""
    info: MediaInfo
    source: bytes | Path
    """The encoded source itself (bytes) or its path: its audio packets are re-read from here when remuxing."""

    @property
    def frame_rate(self) -> Fraction:
        return self.info.frame_rate

    @property
    def fps(self) -> float:
        return self.info.fps

    @property
    def num_frames(self) -> int:
        return self.info.num_frames

    @property
    def height(self) -> int:
        return self.info.height

    @property
    def width(self) -> int:
        return self.info.width

    @property
    def duration_s(self) -> float:
        return self.info.duration_s

    @property
    def has_audio(self) -> bool:
        return self.info.has_audio


# -- reading --------------------------------------------------------------------------------------------------


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


def _encoded_source(src: str | os.PathLike | bytes) -> bytes | Path:
    """`src` as the bytes or the path of an existing, non-empty input."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise MediaError("empty data is not a video")
        return data
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{str(path)!r} is not a file")
        return path
    raise TypeError(f"src must be a path or bytes, got {type(src).__name__}")


def _size(source: bytes | Path) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def container_format(head: bytes) -> str | None:
    """The FFmpeg demuxer of a file starting with `head` (its first 12 bytes suffice), or None when it is none of
    the accepted containers: an ISO-BMFF / QuickTime box at offset 4 (MP4, MOV, M4V) -> "mov"; the EBML magic
    (Matroska, WebM) -> "matroska"."""
    if head[4:8] in _QUICKTIME_BOXES:
        return "mov"
    if head.startswith(_EBML_MAGIC):
        return "matroska"
    return None


@contextlib.contextmanager
def _open_input(source: bytes | Path, what: str = "") -> Iterator[av.container.InputContainer]:
    """`source` opened for reading, confined (see the module docstring): the demuxer chosen by its magic bytes, read
    through a Python file object, no nested protocol, bounded probing, an I/O timeout."""
    with (io.BytesIO(source) if isinstance(source, bytes) else source.open("rb")) as file:
        head = file.read(12)
        demuxer = container_format(head)
        if demuxer is None:
            raise MediaError(
                f"{what}not a readable video container: accepted are MP4/MOV and WebM/Matroska, and the data starts "
                f"with {head[:12]!r}"
            )
        file.seek(0)
        try:
            container = av.open(
                file, mode="r", format=demuxer, options={**_DEMUXER_OPTIONS, **_PRIVATE_OPTIONS[demuxer]},
                timeout=OPEN_TIMEOUT_S,
            )
        except av.error.FFmpegError as e:
            raise MediaError(f"{what}not a readable video container ({e})") from e
        with container:
            yield container


def _video_stream(container: av.container.InputContainer) -> tuple[av.VideoStream, Fraction]:
    """The first video stream and its exact average frame rate."""
    if not container.streams.video:
        raise MediaError("the file has no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise MediaError("the video stream has no frame rate")
    return stream, Fraction(rate.numerator, rate.denominator)


def _audio_fields(stream: av.AudioStream | None) -> dict[str, Any]:
    """`MediaInfo`'s audio fields for an input's first audio stream (or None: no audio)."""
    if stream is None:
        return {"audio_codec": None, "sample_rate": None, "audio_channels": None, "audio_duration_s": 0.0}
    ctx = stream.codec_context
    return {
        "audio_codec": ctx.name,
        "sample_rate": int(ctx.sample_rate),
        "audio_channels": int(ctx.channels),
        "audio_duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
    }


def _describe(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    width: int,
    height: int,
    frame_rate: Fraction,
    num_frames: int,
    size: int,
) -> MediaInfo:
    return MediaInfo(
        width=int(width),
        height=int(height),
        frame_rate=frame_rate,
        num_frames=num_frames,
        video_codec=stream.codec_context.name,
        pix_fmt=stream.codec_context.pix_fmt,
        bytes=size,
        **_audio_fields(container.streams.audio[0] if container.streams.audio else None),
    )


def _check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise MediaTooLargeError(f"the video is {width}x{height}, over max_pixels={max_pixels}")


def probe(src: str | os.PathLike | bytes, max_frames: int | None = None, max_pixels: int | None = None) -> MediaInfo:
    """Describe the video in `src` (a path or the file's bytes) without decoding it: the first frame is decoded
    (so the stream is known to decode, at its true size) and the video packets are counted as frames.

    Raises `MediaError` for data FFmpeg cannot open, without a video stream, frame rate or decodable first frame,
    and `MediaTooLargeError` past `max_frames` (counting stops there) or past `max_pixels` (the size the container
    declares is checked before the first frame is decoded, the decoded size after).
    """
    for name, bound in (("max_frames", max_frames), ("max_pixels", max_pixels)):
        if bound is not None and (not isinstance(bound, int) or bound < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {bound!r}")
    source = _encoded_source(src)
    with _open_input(source) as container:
        stream, frame_rate = _video_stream(container)
        _check_pixels(stream.codec_context.width, stream.codec_context.height, max_pixels)
        try:
            first = next(container.decode(stream), None)
            if first is None:
                raise MediaError("the video stream has no decodable frame")
            _check_pixels(first.width, first.height, max_pixels)
            container.seek(0)
            num_frames = 0
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                num_frames += 1
                if max_frames is not None and num_frames > max_frames:
                    raise MediaTooLargeError(f"the video has more than max_frames={max_frames} frames")
        except av.error.FFmpegError as e:
            raise MediaError(f"the video stream cannot be decoded ({e})") from e
        return _describe(container, stream, first.width, first.height, frame_rate, num_frames, _size(source))


def read_video(src: str | os.PathLike | bytes, max_frames: int | None = None) -> SourceVideo:
    """Decode every frame of `src` (a path or the file's bytes) to RGB, as a uint8 (F, H, W, 3) torch tensor.

    Raises `MediaError` for data FFmpeg cannot open or decode, or without a video stream or any decodable frame,
    and `MediaTooLargeError` past `max_frames` (checked while decoding, so a huge upload is not fully decoded).
    Rotation metadata is not applied and variable-frame-rate sources are treated as constant at their average rate.
    """
    import torch

    if max_frames is not None and (not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
    source = _encoded_source(src)
    frames: list[np.ndarray] = []
    with _open_input(source) as container:
        stream, frame_rate = _video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        try:
            for frame in container.decode(stream):
                if max_frames is not None and len(frames) >= max_frames:
                    raise MediaTooLargeError(f"the video has more than max_frames={max_frames} frames")
                # every frame at the stream's size, so a mid-stream size change cannot break stacking
                frames.append(frame.to_ndarray(format="rgb24", width=width, height=height))
        except av.error.FFmpegError as e:
            raise MediaError(f"the video stream cannot be decoded ({e})") from e
        if not frames:
            raise MediaError("the video stream has no decodable frame")
        info = _describe(container, stream, width, height, frame_rate, len(frames), _size(source))
    return SourceVideo(frames=torch.from_numpy(np.stack(frames)), info=info, source=source)


# -- writing --------------------------------------------------------------------------------------------------


def _check_rgb_frames(frames: Any, name: str = "frames") -> np.ndarray:
    """`frames` (a uint8 (F, H, W, 3) array or tensor) as a numpy array H.264 yuv420p can take, or a `MediaError`
    naming `name`."""
    array = frames.detach().cpu().numpy() if hasattr(frames, "detach") else frames
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] != 3:
        raise MediaError(
            f"{name} must be uint8 (F, H, W, 3), got {getattr(array, 'dtype', type(array).__name__)} "
            f"{tuple(getattr(array, 'shape', ()))}"
        )
    if array.shape[0] < 1:
        raise MediaError(f"{name} must hold at least one frame")
    height, width = array.shape[1:3]
    if width % 2 or height % 2:
        raise MediaError(f"{name}: H.264 yuv420p needs an even size, got {width}x{height}")
    return array


def _check_encoding(crf: int, preset: str) -> None:
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    if preset not in X264_PRESETS:
        raise ValueError(f"preset must be one of {X264_PRESETS}, got {preset!r}")


def add_h264_stream(
    container: av.container.OutputContainer, width: int, height: int, frame_rate: Fraction, crf: int, preset: str
) -> av.VideoStream:
    """Add an H.264 yuv420p stream at `frame_rate` (one frame per tick) to an output container."""
    stream = container.add_stream("libx264", rate=frame_rate)
    stream.width, stream.height = width, height
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": preset}
    return stream


def encode_frames(container: av.container.OutputContainer, stream: av.VideoStream, frames: np.ndarray) -> None:
    """Encode uint8 (F, H, W, 3) RGB `frames` into `stream` (from `add_h264_stream`) and flush the encoder."""
    time_base = 1 / Fraction(stream.codec_context.framerate)  # one tick per frame
    for index in range(frames.shape[0]):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[index]), format="rgb24")
        frame.pts = index
        frame.time_base = time_base
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _open_output(out: str | os.PathLike | BinaryIO) -> tuple[av.container.OutputContainer, int]:
    """An MP4 output container on a path (with faststart) or a seekable binary file object (without: faststart
    rewrites the file by name), and the file object's start offset (0 for a path)."""
    if hasattr(out, "write"):
        return av.open(out, mode="w", format="mp4"), out.tell()
    # faststart: the index first, for progressive playback
    return av.open(str(out), mode="w", format="mp4", options={"movflags": "+faststart"}), 0


def _written_size(out: str | os.PathLike | BinaryIO, start: int) -> int:
    if hasattr(out, "write"):
        out.seek(0, io.SEEK_END)
        return out.tell() - start
    return Path(out).stat().st_size


def mux_mp4(
    media: DecodedMedia, out: str | os.PathLike | BinaryIO, crf: int = 18, preset: str = "veryfast"
) -> MediaInfo:
    """Write `media` as an MP4 (H.264 yuv420p + AAC stereo) to a path (with faststart) or a seekable binary file
    object (without). `preset` is x264's speed/size trade-off: `veryfast` is ~3x faster than `medium` at similar
    quality."""
    frames = _check_rgb_frames(media.frames, "media.frames")
    audio = media.audio
    if not isinstance(audio, np.ndarray) or audio.ndim != 2 or audio.shape[0] not in (1, 2):
        raise ValueError(f"media.audio must be (channels in 1..2, samples), got {getattr(audio, 'shape', audio)}")
    if media.sample_rate <= 0:
        raise ValueError(f"media.sample_rate must be > 0, got {media.sample_rate}")
    if not media.fps > 0:
        raise ValueError(f"media.fps must be > 0, got {media.fps}")
    _check_encoding(crf, preset)
    num_frames, height, width = frames.shape[:3]
    samples = np.ascontiguousarray(np.clip(audio, -1.0, 1.0).astype(np.float32))
    if samples.shape[0] == 1:
        samples = np.repeat(samples, 2, axis=0)

    rate = Fraction(media.fps).limit_denominator(1000)
    container, start = _open_output(out)
    try:
        video_stream = add_h264_stream(container, width, height, rate, crf, preset)
        audio_stream = container.add_stream("aac", rate=media.sample_rate, layout="stereo")
        audio_stream.format = "fltp"
        encode_frames(container, video_stream, frames)

        for offset in range(0, samples.shape[1], AUDIO_CHUNK):
            chunk = np.ascontiguousarray(samples[:, offset : offset + AUDIO_CHUNK])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate = media.sample_rate
            frame.pts = offset
            frame.time_base = Fraction(1, media.sample_rate)
            container.mux(audio_stream.encode(frame))
        container.mux(audio_stream.encode(None))
    finally:
        container.close()

    return MediaInfo(
        width=width,
        height=height,
        frame_rate=rate,
        num_frames=num_frames,
        video_codec="h264",
        pix_fmt="yuv420p",
        audio_codec="aac",
        sample_rate=media.sample_rate,
        audio_channels=2,
        audio_duration_s=audio.shape[1] / media.sample_rate,
        bytes=_written_size(out, start),
    )


def remux_with_source_audio(
    frames: torch.Tensor | np.ndarray,
    fps: float | Fraction,
    source: SourceVideo | str | os.PathLike | bytes,
    out: str | os.PathLike | BinaryIO,
    *,
    crf: int,
    preset: str = "veryfast",
) -> MediaInfo:
    """Write `frames` (uint8 (F, H, W, 3)) as H.264 yuv420p at `fps`, plus the first audio stream of `source` (a
    `SourceVideo`, or the source file's path or bytes) copied packet for packet, without re-encoding, to an MP4 path
    (with faststart) or a seekable binary file object. A source without audio gives a video-only MP4.

    Edits pass `EditConfig.mp4_crf` as `crf`: low (8), because the pixels outside the mask are re-encoded too and
    must stay close to the source (see `tests/test_vace.py`). Pass `source.frame_rate` as `fps` to keep an exact
    NTSC-style rate (a float is rounded to a denominator <= 1001). Raises `MediaError` when the source's audio codec
    cannot be stored in an MP4 (see `mp4_accepts`).
    """
    array = _check_rgb_frames(frames)
    _check_encoding(crf, preset)
    frame_rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    if not frame_rate > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    encoded = source.source if isinstance(source, SourceVideo) else _encoded_source(source)

    num_frames, height, width = array.shape[:3]
    container, start = _open_output(out)
    try:
        with _open_input(encoded, "source: ") as src_container:
            src_audio = src_container.streams.audio[0] if src_container.streams.audio else None
            out_audio = None
            audio = _audio_fields(src_audio)
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
                for packet in src_container.demux(src_audio):
                    if packet.dts is None:  # the demuxer's end-of-stream marker, not data
                        continue
                    packet.stream = out_audio
                    container.mux(packet)
        encode_frames(container, video_stream, array)
    finally:
        container.close()

    return MediaInfo(
        width=width,
        height=height,
        frame_rate=frame_rate,
        num_frames=num_frames,
        video_codec="h264",
        pix_fmt="yuv420p",
        bytes=_written_size(out, start),
        **audio,
    )
