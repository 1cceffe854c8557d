"""`imagine.api.intake`: the one data-URI parser of image, source-video and mask inputs. Bounded memory on hostile
input, size checked before decoding, every error a 4xx naming the field."""

from __future__ import annotations

import base64
import io
import tracemalloc

import pytest
from PIL import Image, ImageFile

from imagine.api import intake
from imagine.api.errors import ApiError
from imagine.api.intake import IMAGE, MAX_HEADER_CHARS, VIDEO, decode_data_uri, decode_image, decode_video
from imagine.config import LimitsConfig

MB = 1024 * 1024


def _peak_bytes(fn, *args) -> int:
    """Peak Python memory allocated while `fn(*args)` runs (ApiError allowed)."""
    tracemalloc.start()
    try:
        try:
            fn(*args)
        except ApiError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("tail", ["", ",AAAA"])
def test_a_hostile_header_costs_a_small_multiple_of_its_size(tail):
    hostile = "data:x/y" + ";a=b" * (2 * MB // 4) + tail  # ~2 MB of parameters, with or without a payload after them
    peak = _peak_bytes(decode_video, hostile, "video_url", 64 * MB)
    assert peak < 10 * len(hostile), f"{peak} bytes for a {len(hostile)}-character URI"
    err = _error(decode_video, hostile, "video_url", 64 * MB)
    assert (err.status, err.code, err.param) == (400, "invalid_video_url", "video_url")
    assert str(MAX_HEADER_CHARS) in err.message


def test_a_large_valid_payload_decodes_in_a_small_multiple_of_its_size():
    data = bytes(range(256)) * (2 * MB // 256)
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    assert decode_video(uri, "video_url", 64 * MB) == data
    peak = _peak_bytes(decode_video, uri, "video_url", 64 * MB)
    assert peak < 10 * len(uri), f"{peak} bytes for a {len(uri)}-character URI"


def test_size_is_checked_before_decoding():
    # over the limit AND not base64: the 413 comes first, so nothing was decoded
    err = _error(decode_data_uri, "data:video/mp4;base64," + "%" * 4000, "mask.video_url", VIDEO, 1000)
    assert (err.status, err.code, err.param) == (413, "video_too_large", "mask.video_url")


@pytest.mark.parametrize(
    "payload,reason",
    [("%%%", "Only base64"), ("AA==AA", "padding"), ("AAAAA", "1 more than a multiple of 4"), ("AA AA", "Only base64"),
     ("AAAé", "non-ASCII")],
)
def test_bad_base64_is_400_naming_the_field(payload, reason):
    for fn, field, code in ((decode_video, "mask.video_url", "invalid_video_url"), (decode_video, "video_url", "invalid_video_url")):
        err = _error(fn, f"data:video/mp4;base64,{payload}", field, MB)
        assert (err.status, err.code, err.param) == (400, code, field)
        assert field in err.message and reason in err.message
    err = _error(decode_image, f"data:image/png;base64,{payload}", "image_url", LimitsConfig())
    assert (err.status, err.code, err.param) == (400, "invalid_image_url", "image_url")


@pytest.mark.parametrize(
    "uri,kind,data",
    [
        ("data:video/mp4;base64,AAAA", VIDEO, b"\0\0\0"),
        ("data:;base64,AAAA", VIDEO, b"\0\0\0"),  # no media type: the content decides
        ("data:video/mp4;codecs=avc1.42E01E;base64,AAAA", VIDEO, b"\0\0\0"),
        ("data:application/octet-stream;base64,AAAA", VIDEO, b"\0\0\0"),
        ("data:image/png;BASE64,AAAA", IMAGE, b"\0\0\0"),
        ("data:video/mp4;base64,", VIDEO, b""),
    ],
)
def test_accepted_headers(uri, kind, data):
    assert decode_data_uri(uri, "f", kind, MB) == data


@pytest.mark.parametrize(
    "uri,kind,status,code",
    [
        ("https://example.com/a.mp4", VIDEO, 400, "unsupported_video_url"),
        ("data:video/mp4,AAAA", VIDEO, 400, "invalid_video_url"),  # not base64
        ("data:video/mp4;codecs;base64,AAAA", VIDEO, 400, "invalid_video_url"),  # a parameter without a value
        ("data:video;base64,AAAA", VIDEO, 400, "invalid_video_url"),  # a type without a subtype
        ("data:vid eo/mp4;base64,AAAA", VIDEO, 400, "invalid_video_url"),
        ("data:video/mp4;base64", VIDEO, 400, "invalid_video_url"),  # no ','
        ("data:image/png;base64,AAAA", VIDEO, 400, "invalid_video_url"),  # wrong media type
        ("data:text/plain;base64,AAAA", IMAGE, 400, "invalid_image_url"),
        ("data:image/png;base64,AAAA", IMAGE, 413, "image_too_large"),  # 3 bytes > max 2
    ],
)
def test_rejected_uris_name_the_field(uri, kind, status, code):
    err = _error(decode_data_uri, uri, "the_field", kind, 2 if status == 413 else MB)
    assert (err.status, err.code, err.param) == (status, code, "the_field")


def test_decode_image_normalises_to_png_and_checks_pixels():
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="JPEG")
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    with Image.open(io.BytesIO(decode_image(uri, "image_url", LimitsConfig()))) as img:
        assert img.format == "PNG" and img.size == (40, 30)
    err = _error(decode_image, uri, "image_url", LimitsConfig(max_image_pixels=100))
    assert (err.status, err.code, err.param) == (413, "image_too_large", "image_url")
    err = _error(decode_image, "data:image/png;base64," + base64.b64encode(b"not an image").decode(), "image_url", LimitsConfig())
    assert (err.status, err.code, err.param) == (400, "invalid_image", "image_url")


def _image_uri(fmt: str, size: tuple[int, int] = (40, 30), mime: str = "image/png") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_each_allowed_image_format_is_recognised_by_its_magic(fmt):
    raw = base64.b64decode(_image_uri(fmt).split(",", 1)[1])
    assert intake.image_format(raw[:12]) == fmt
    with Image.open(io.BytesIO(decode_image(_image_uri(fmt), "image_url", LimitsConfig()))) as img:
        assert img.format == "PNG" and img.size == (40, 30)


@pytest.mark.parametrize("fmt", ["TIFF", "PPM", "ICO", "TGA"])
def test_other_image_formats_are_refused_before_pillow_opens_them(fmt, monkeypatch):
    uri = _image_uri(fmt, size=(500, 500))  # declared image/png: a media type that lies is no help either
    opened: list = []
    monkeypatch.setattr(intake.Image, "open", lambda *a, **k: opened.append(a))
    err = _error(decode_image, uri, "image_url", LimitsConfig())
    assert (err.status, err.code, err.param) == (400, "invalid_image", "image_url") and "PNG, JPEG" in err.message
    assert opened == []


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming `width` x `height` (signature, IHDR) with one tiny IDAT: far smaller than its pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def test_pixels_are_checked_from_the_header_before_decoding(monkeypatch):
    decoded: list = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    uri = "data:image/png;base64," + base64.b64encode(_png_header(8000, 6000)).decode()  # 48 MP in under 100 bytes
    err = _error(decode_image, uri, "image_url", LimitsConfig())
    assert (err.status, err.code, err.param) == (413, "image_too_large", "image_url") and "8000x6000" in err.message
    assert decoded == []
    # past Pillow's own decompression-bomb ceiling, whatever the configured limit: 413 too
    uri = "data:image/png;base64," + base64.b64encode(_png_header(20000, 20000)).decode()
    err = _error(decode_image, uri, "image_url", LimitsConfig(max_image_pixels=10**9))
    assert (err.status, err.code, err.param) == (413, "image_too_large", "image_url")
