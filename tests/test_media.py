"""Probing and reading videos, and writing edited frames with the source's audio stream-copied (PyAV, no
models)."""

from __future__ import annotations

import io
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from imagine.config import EditConfig
from imagine.pipeline.media import (
    MediaError,
    MediaInfo,
    MediaTooLargeError,
    add_h264_stream,
    container_format,
    encode_frames,
    mp4_accepts,
    mux_mp4,
    probe,
    read_video,
    remux_with_source_audio,
)
from imagine.pipeline.types import DecodedMedia

NUM_FRAMES, HEIGHT, WIDTH, FPS, SAMPLE_RATE = 25, 72, 100, 24.0, 16000
CRF = EditConfig().mp4_crf  # what the editor writes with


def synthetic_frames(num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """Smooth moving colour gradients: compressible like real footage, different in every frame."""
    t, y, x = np.meshgrid(np.arange(num_frames), np.arange(height), np.arange(width), indexing="ij")
    red = 128 + 80 * np.sin(x / 11.0 + t / 4.0)
    green = 128 + 80 * np.cos(y / 9.0 - t / 6.0)
    blue = 128 + 60 * np.sin((x + y) / 15.0 + t / 5.0)
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def sine(duration_s: float, freq: float = 440.0) -> np.ndarray:
    n = round(duration_s * SAMPLE_RATE)
    wave = 0.4 * np.sin(2 * np.pi * freq * np.arange(n) / SAMPLE_RATE)
    return np.stack([wave, 0.5 * wave]).astype(np.float32)  # stereo, channels differ


@pytest.fixture(scope="module")
def source_frames() -> np.ndarray:
    return synthetic_frames()


@pytest.fixture(scope="module")
def source_mp4(source_frames: np.ndarray) -> bytes:
    """An H.264 + AAC MP4 as the generation path writes them."""
    buf = io.BytesIO()
    mux_mp4(DecodedMedia(source_frames, sine(NUM_FRAMES / FPS), SAMPLE_RATE, FPS), buf, crf=18)
    return buf.getvalue()


def audio_packets(data: bytes | Path) -> list[tuple[int, int, bytes]]:
    """(pts, dts, payload) of every audio packet, in stream time base."""
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
        stream = container.streams.audio[0]
        return [(p.pts, p.dts, bytes(p)) for p in container.demux(stream) if p.dts is not None]


def decoded_audio(data: bytes | Path) -> np.ndarray:
    with av.open(io.BytesIO(data) if isinstance(data, bytes) else str(data)) as container:
        return np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)


def video_only_mp4(frames: np.ndarray, rate: Fraction) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = add_h264_stream(container, frames.shape[2], frames.shape[1], rate, crf=18, preset="veryfast")
        encode_frames(container, stream, frames)
    return buf.getvalue()


def test_read_video_from_bytes_and_path(source_mp4, source_frames, tmp_path):
    video = read_video(source_mp4)
    assert video.frames.dtype == torch.uint8
    assert tuple(video.frames.shape) == (NUM_FRAMES, HEIGHT, WIDTH, 3)
    info = video.info
    assert (info.num_frames, info.height, info.width) == (NUM_FRAMES, HEIGHT, WIDTH)
    assert video.frame_rate == info.frame_rate == Fraction(24) and info.fps == FPS
    assert info.duration_s == pytest.approx(NUM_FRAMES / FPS)
    assert (info.video_codec, info.pix_fmt, info.bytes) == ("h264", "yuv420p", len(source_mp4))
    assert info.has_audio
    assert (info.audio_codec, info.sample_rate, info.audio_channels) == ("aac", SAMPLE_RATE, 2)
    assert mp4_accepts(info.audio_codec)
    assert info.audio_duration_s == pytest.approx(NUM_FRAMES / FPS, abs=0.07)  # AAC pads to 1024-sample blocks
    # the decoded frames are the encoded ones (lossy: H.264 crf 18 + yuv420p)
    error = np.abs(video.frames.numpy().astype(int) - source_frames.astype(int))
    assert error.mean() < 3.0

    path = tmp_path / "source.mp4"
    path.write_bytes(source_mp4)
    from_path = read_video(path)
    assert torch.equal(from_path.frames, video.frames)
    assert from_path.source == path and video.source == source_mp4
    assert from_path.info == info


def test_probe_describes_without_decoding_and_agrees_with_read_video(source_mp4, tmp_path):
    path = tmp_path / "source.mp4"
    path.write_bytes(source_mp4)
    info = probe(source_mp4)
    assert info == probe(path) == read_video(source_mp4).info
    frames = synthetic_frames(num_frames=5, height=32, width=48)
    video_only = probe(video_only_mp4(frames, Fraction(30000, 1001)))
    assert (video_only.num_frames, video_only.width, video_only.height) == (5, 48, 32)
    assert video_only.frame_rate == Fraction(30000, 1001)
    assert not video_only.has_audio and video_only.audio_codec is None and video_only.audio_duration_s == 0.0


def test_probe_needs_no_torch(source_mp4, tmp_path):
    """The HTTP ingress probes uploads with this module: it must not load torch."""
    path = tmp_path / "source.mp4"
    path.write_bytes(source_mp4)
    code = (
        "import sys; from imagine.pipeline.media import probe; info = probe(sys.argv[1]); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print(info.num_frames)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(NUM_FRAMES)]


def test_remux_keeps_timing_and_size_and_copies_audio_packets(source_mp4, tmp_path):
    source = read_video(source_mp4)
    edited = 255 - source.frames  # every pixel changed
    out = tmp_path / "edited.mp4"
    info = remux_with_source_audio(edited, source.frame_rate, source, out, crf=CRF)

    assert isinstance(info, MediaInfo) and info.has_audio
    assert (info.num_frames, info.width, info.height, info.fps) == (NUM_FRAMES, WIDTH, HEIGHT, FPS)
    assert info.bytes == out.stat().st_size > 0
    result = read_video(out)
    assert (result.info.num_frames, result.info.height, result.info.width) == (NUM_FRAMES, HEIGHT, WIDTH)
    assert result.frame_rate == source.frame_rate
    # what it says it wrote is what a reader finds (bar the counts a writer cannot know before closing the file)
    assert info.audio_codec == result.info.audio_codec == "aac" and info.sample_rate == result.info.sample_rate
    assert (info.video_codec, info.pix_fmt) == (result.info.video_codec, result.info.pix_fmt)
    # the video is the new frames (re-encoded at the edit CRF)...
    assert np.abs(result.frames.numpy().astype(int) - edited.numpy().astype(int)).mean() < 2.0
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
    # ...and the audio is the source's, packet for packet (bytes and timestamps), so it decodes identically
    assert audio_packets(out) == audio_packets(source_mp4)
    assert len(audio_packets(out)) > 10
    np.testing.assert_array_equal(decoded_audio(out), decoded_audio(source_mp4))


def test_remux_accepts_source_path_or_bytes_and_writes_to_file_objects(source_mp4, tmp_path):
    path = tmp_path / "source.mp4"
    path.write_bytes(source_mp4)
    frames = read_video(source_mp4).frames.numpy()
    for source in (path, source_mp4):
        buf = io.BytesIO()
        info = remux_with_source_audio(frames, FPS, source, buf, crf=CRF)
        assert info.bytes == len(buf.getvalue()) and info.has_audio
        assert audio_packets(buf.getvalue()) == audio_packets(source_mp4)


def test_remux_keeps_an_exact_ntsc_rate():
    rate = Fraction(30000, 1001)
    frames = synthetic_frames(num_frames=6, height=32, width=48)
    source = read_video(video_only_mp4(frames, rate))
    assert source.frame_rate == rate
    buf = io.BytesIO()
    # a float fps is snapped back to 30000/1001
    info = remux_with_source_audio(source.frames, source.info.fps, source, buf, crf=CRF)
    assert info.fps == pytest.approx(float(rate))
    assert read_video(buf.getvalue()).frame_rate == rate


def test_source_without_audio_gives_video_only_output():
    frames = synthetic_frames(num_frames=5, height=32, width=48)
    source = read_video(video_only_mp4(frames, Fraction(24)))
    assert not source.info.has_audio and source.info.audio_codec is None
    buf = io.BytesIO()
    info = remux_with_source_audio(source.frames, source.frame_rate, source, buf, crf=CRF)
    assert not info.has_audio and info.audio_duration_s == 0.0
    with av.open(io.BytesIO(buf.getvalue())) as container:
        assert len(container.streams.audio) == 0 and len(container.streams.video) == 1


def test_audio_codec_mp4_cannot_hold_is_refused_clearly():
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mov") as container:
        video = add_h264_stream(container, 32, 32, Fraction(24), crf=18, preset="veryfast")
        audio = container.add_stream("pcm_mulaw", rate=8000, layout="mono")
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        samples.sample_rate, samples.pts = 8000, 0
        container.mux(audio.encode(samples))
        container.mux(audio.encode(None))
        encode_frames(container, video, np.zeros((5, 32, 32, 3), np.uint8))
    source = read_video(buf.getvalue())
    assert source.info.audio_codec == "pcm_mulaw" and not mp4_accepts(source.info.audio_codec)
    with pytest.raises(MediaError, match="pcm_mulaw"):
        remux_with_source_audio(source.frames, source.frame_rate, source, io.BytesIO(), crf=CRF)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"definitely not a video " * 50, "not a readable video"),
        (b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "not a readable video"),  # MP4 header, no content
    ],
)
def test_undecodable_data_raises_media_error(data, message):
    for reader in (read_video, probe):
        with pytest.raises(MediaError, match=message) as info:
            reader(data)
        assert isinstance(info.value, ValueError)  # the API maps ValueErrors to 4xx


def test_truncated_and_audio_only_files_raise_media_error(source_mp4, tmp_path):
    with pytest.raises(MediaError):
        read_video(source_mp4[: len(source_mp4) // 2])  # moov atom (at the end of a streamed MP4) cut off
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE, layout="stereo")
        frame = av.AudioFrame.from_ndarray(sine(0.1)[:, :1024].copy(), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    for reader in (read_video, probe):
        with pytest.raises(MediaError, match="no video stream"):
            reader(buf.getvalue())
        with pytest.raises(MediaError, match="not a file"):
            reader(tmp_path / "absent.mp4")


def _written(fmt: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=24)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        encode_frames(container, stream, np.zeros((3, 32, 32, 3), np.uint8))
    return buf.getvalue()


@pytest.mark.parametrize(
    "fmt,codec,demuxer", [("mp4", "libx264", "mov"), ("mov", "libx264", "mov"), ("matroska", "libx264", "matroska"),
                          ("webm", "libvpx-vp9", "matroska")],
)
def test_accepted_containers_are_recognised_by_magic_and_read(fmt, codec, demuxer):
    data = _written(fmt, codec)
    assert container_format(data[:12]) == demuxer
    assert probe(data).num_frames == read_video(data).num_frames == 3


@pytest.mark.parametrize(
    "text",
    [
        b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 5004 RTP/AVP 96\n",  # SDP: RTP sockets
        b"ffconcat version 1.0\nfile '/etc/passwd'\n",  # concat: local files
        b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:9/a.ts\n",  # HLS: HTTP
        b"GIF89a" + b"\0" * 64,  # a format FFmpeg reads, but not a video container of ours
    ],
)
def test_other_inputs_are_refused_before_ffmpeg_opens_them(text, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(av, "open", lambda *a, **k: calls.append(a))
    path = tmp_path / "upload.mp4"
    path.write_bytes(text)
    for src in (text, path):
        for reader in (probe, read_video):
            with pytest.raises(MediaError, match="accepted are MP4/MOV and WebM/Matroska"):
                reader(src)
    assert container_format(text[:12]) is None and calls == []


def test_inputs_are_opened_confined(source_mp4, tmp_path, monkeypatch):
    """A file object, never a path or URL string; the demuxer forced; no protocol for nested opens; bounded probing;
    an I/O timeout."""
    seen: list = []
    real_open = av.open

    def spy(file, *args, **kwargs):
        seen.append((file, kwargs))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(av, "open", spy)
    path = tmp_path / "source.mp4"
    path.write_bytes(source_mp4)
    probe(source_mp4)
    read_video(path)
    remux_with_source_audio(np.zeros((2, 32, 32, 3), np.uint8), FPS, path, io.BytesIO(), crf=CRF)
    inputs = [(file, kwargs) for file, kwargs in seen if kwargs.get("mode", "r") == "r"]
    assert len(inputs) == 3
    for file, kwargs in inputs:
        assert hasattr(file, "read") and not isinstance(file, (str, Path))
        assert kwargs["format"] == "mov" and kwargs["timeout"] > 0
        options = kwargs["options"]
        assert options["protocol_whitelist"] == "" and options["format_whitelist"] == "mov,matroska"
        assert int(options["probesize"]) > 0 and int(options["analyzeduration"]) > 0
        assert options["enable_drefs"] == "0"


def test_probe_stops_at_max_frames_and_max_pixels(source_mp4):
    with pytest.raises(MediaTooLargeError, match="max_frames=10"):
        probe(source_mp4, max_frames=10)
    with pytest.raises(MediaTooLargeError, match=f"{WIDTH}x{HEIGHT}, over max_pixels=100"):
        probe(source_mp4, max_pixels=100)
    assert probe(source_mp4, max_frames=NUM_FRAMES, max_pixels=WIDTH * HEIGHT).num_frames == NUM_FRAMES
    with pytest.raises(ValueError, match="max_frames"):
        probe(source_mp4, max_frames=0)


def test_max_frames_stops_decoding(source_mp4):
    with pytest.raises(MediaTooLargeError, match="max_frames=10") as info:
        read_video(source_mp4, max_frames=10)
    assert isinstance(info.value, MediaError)
    assert read_video(source_mp4, max_frames=NUM_FRAMES).info.num_frames == NUM_FRAMES


def test_remux_rejects_bad_frames(source_mp4):
    source = read_video(source_mp4)
    with pytest.raises(MediaError, match="even size"):
        remux_with_source_audio(source.frames[:, :71], FPS, source, io.BytesIO(), crf=CRF)
    with pytest.raises(ValueError, match="uint8"):
        remux_with_source_audio(source.frames.float() / 255, FPS, source, io.BytesIO(), crf=CRF)
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        remux_with_source_audio(source.frames[None], FPS, source, io.BytesIO(), crf=CRF)
    with pytest.raises(ValueError, match="crf"):
        remux_with_source_audio(source.frames, FPS, source, io.BytesIO(), crf=60)
    with pytest.raises(ValueError, match="preset"):
        remux_with_source_audio(source.frames, FPS, source, io.BytesIO(), crf=CRF, preset="warp")
