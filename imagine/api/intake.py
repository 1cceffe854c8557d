"""Media inputs of a request as bytes: `data:` URIs (image, source video, mask video) decoded by one parser, http(s)
URLs fetched by `imagine.api.remote` (address policy, limits, sniffing), and
images normalised to PNG. Every failure is an `ApiError` naming the request field.

The parser reads a URI in bounded memory whatever it holds: it looks for the ',' that ends the header only within
the first `MAX_HEADER_CHARS` characters, parses that header by hand (no regex), checks the payload's size before
decoding it, and decodes it straight from one ASCII copy (about 1.75x the URI's size in all)."""

from __future__ import annotations

import binascii
import io
import string
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from imagine.api.errors import ApiError
from imagine.config import LimitsConfig

MAX_HEADER_CHARS = 1024  # media type + parameters; real data URIs need a few dozen characters
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "._+-")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # Pillow's names; each recognised by `image_format`


@dataclass(frozen=True)
class MediaKind:
    """What one kind of media input accepts; `noun` names its error codes (`invalid_<noun>_url`, `<noun>_too_large`)."""

    noun: str
    media_types: tuple[str, ...]  # exact types, or prefixes ending in "/"
    example: str

    def accepts(self, media_type: str) -> bool:
        media_type = media_type.lower()
        return any(media_type.startswith(t) if t.endswith("/") else media_type == t for t in self.media_types)


IMAGE = MediaKind("image", ("image/",), "data:image/png;base64,...")
VIDEO = MediaKind("video", ("video/", "application/octet-stream"), "data:video/mp4;base64,...")


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TOKEN_CHARS for c in text)


def _parse_header(header: str) -> tuple[str | None, bool] | None:
    """`type/subtype;name=value;...;base64` (RFC 2397, every part optional) -> (media type or None, base64?);
    None when it is not of that form."""
    parts = header.split(";")
    media_type = parts[0] or None
    if media_type is not None:
        kind, slash, subtype = media_type.partition("/")
        if not (slash and _is_token(kind) and _is_token(subtype)):
            return None
    params = parts[1:]
    is_base64 = bool(params) and params[-1].lower() == "base64"
    for param in params[:-1] if is_base64 else params:
        name, eq, value = param.partition("=")
        if not (eq and _is_token(name) and _is_token(value)):
            return None
    return media_type, is_base64


def decode_data_uri(value: str, field: str, kind: MediaKind, max_bytes: int) -> bytes:
    """The bytes of a base64 `data:` URI of `kind` (400 not a data URI / wrong media type / bad base64, 413 over
    `max_bytes`; each naming `field`)."""
    noun = kind.noun
    if not value.startswith("data:"):
        raise ApiError(
            400, f"unsupported_{noun}_url", f"{field} must be an https:// URL or a data URI ({kind.example})",
            field,
        )
    comma = value.find(",", 5, 5 + MAX_HEADER_CHARS + 1)
    parsed = _parse_header(value[5:comma]) if comma >= 0 else None
    if parsed is None or not parsed[1]:
        raise ApiError(
            400, f"invalid_{noun}_url",
            f"{field} is not a base64 data URI ({kind.example}, header of at most {MAX_HEADER_CHARS} characters)", field,
        )
    media_type = parsed[0]
    if media_type is not None and not kind.accepts(media_type):
        raise ApiError(400, f"invalid_{noun}_url", f"{field} has media type {media_type!r}, not {noun}/*", field)
    if (len(value) - comma - 1) * 3 // 4 > max_bytes:
        raise ApiError(413, f"{noun}_too_large", f"{field} is larger than {max_bytes} bytes", field)
    try:
        ascii_uri = value.encode("ascii")
    except UnicodeEncodeError as e:
        raise ApiError(
            400, f"invalid_{noun}_url", f"{field} has invalid base64: a non-ASCII character at {e.start}", field
        ) from e
    try:
        return binascii.a2b_base64(memoryview(ascii_uri)[comma + 1 :], strict_mode=True)
    except binascii.Error as e:
        raise ApiError(400, f"invalid_{noun}_url", f"{field} has invalid base64: {e}", field) from e


def read_media(value: str, field: str, kind: MediaKind, max_bytes: int, remote: Any = None) -> bytes:
    """A media input's bytes: an http(s) URL fetched by `imagine.api.remote` under `remote` (its
    `RemoteMediaConfig`; None: remote URLs are refused), or a data URI."""
    if value[:8].lower().startswith(("http://", "https://")):
        if remote is None or not remote.enabled:
            raise ApiError(400, f"unsupported_{kind.noun}_url", f"{field}: remote URLs are not fetched on this server; "
                           f"send a data URI ({kind.example})", field)
        from imagine.api import remote as fetcher  # its HTTP client: loaded on the first remote input

        return fetcher.fetch_media(value, field, kind, max_bytes, remote)
    return decode_data_uri(value, field, kind, max_bytes)


def decode_video(value: str, field: str, max_bytes: int, remote: Any = None) -> bytes:
    """A video URL or `data:video/...;base64,` URI -> the file's bytes (not opened here: see
    `imagine.api.edits.probe_video`)."""
    return read_media(value, field, VIDEO, max_bytes, remote)


def image_format(head: bytes) -> str | None:
    """The format of an image starting with `head` (its first 12 bytes suffice) by its magic bytes: one of
    `IMAGE_FORMATS`, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    return None


def decode_image(value: str, field: str, limits: LimitsConfig, remote: Any = None) -> bytes:
    """An image URL or `data:image/...;base64,` URI -> the image as normalised RGB PNG bytes (400 when it is not an image of an
    allowed format, 413 past `limits.max_image_bytes` or `max_image_pixels`).

    Nothing is decoded before the format (from the magic bytes; only that one Pillow plugin may open it) and the
    size (from the header) are known to be allowed."""
    raw = read_media(value, field, IMAGE, limits.max_image_bytes, remote)
    fmt = image_format(raw[:12])
    if fmt is None:
        raise ApiError(
            400, "invalid_image", f"{field} is not a {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} image",
            field,
        )
    try:
        with Image.open(io.BytesIO(raw), formats=[fmt]) as probe:
            w, h = probe.size
            if w * h > limits.max_image_pixels:
                raise ApiError(413, "image_too_large", f"{field} is {w}x{h}, over {limits.max_image_pixels} pixels", field)
            probe.verify()
        with Image.open(io.BytesIO(raw), formats=[fmt]) as img:
            rgb = img.convert("RGB")
    except Image.DecompressionBombError as e:  # past Pillow's own (process-wide) ceiling: refused by its header
        raise ApiError(413, "image_too_large", f"{field}: {e}", field) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, "invalid_image", f"{field} could not be decoded as a {fmt} image: {e}", field) from e
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()
