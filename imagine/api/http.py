"""HTTP details of the routes, apart from what they do: the create headers (`X-Priority`, `X-Start-Deadline`,
`Idempotency-Key`) as one dependency giving `CreateOptions`, RFC 9110 `Range` parsing of content downloads, and the
request body limit on the bytes actually received (`BodyLimitMiddleware`)."""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Header
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from imagine.api.errors import ApiError, error_response
from imagine.api.service import CreateOptions
from imagine.config import TIERS, AppConfig
from imagine.jobs.idempotency import MAX_KEY_CHARS


def parse_priority(value: str | None) -> str:
    """The `X-Priority` header: realtime | standard | batch (default standard)."""
    if value is None:
        return "standard"
    if value.strip().lower() not in TIERS:
        raise ApiError(400, "invalid_priority", f"X-Priority must be one of {', '.join(TIERS)}, got {value!r}", "X-Priority")
    return value.strip().lower()


def parse_start_deadline(value: str | None) -> float | None:
    """The `X-Start-Deadline` header: a positive number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError as e:
        raise ApiError(400, "invalid_start_deadline", f"X-Start-Deadline must be a number of seconds, got {value!r}", "X-Start-Deadline") from e
    if not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(400, "invalid_start_deadline", f"X-Start-Deadline must be > 0 seconds, got {value!r}", "X-Start-Deadline")
    return seconds


def parse_idempotency_key(value: str | None) -> str | None:
    """The `Idempotency-Key` header: 1-255 visible characters."""
    if value is None:
        return None
    if not value or len(value) > MAX_KEY_CHARS or not value.isprintable():
        raise ApiError(400, "invalid_idempotency_key", f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable characters", "Idempotency-Key")
    return value


def create_options(
    priority: str | None = Header(None, alias="X-Priority", description="realtime | standard | batch (capped at the key's tier)."),
    idempotency_key: str | None = Header(None, alias="Idempotency-Key", description="Same key + same body -> the same job."),
    start_deadline: str | None = Header(None, alias="X-Start-Deadline", description="Seconds; still queued then -> expired."),
) -> CreateOptions:
    """`Depends(create_options)` in every create route: its headers, parsed (400 naming the header)."""
    return CreateOptions(
        priority=parse_priority(priority),
        idempotency_key=parse_idempotency_key(idempotency_key),
        start_deadline_s=parse_start_deadline(start_deadline),
    )


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive
    size: int
    partial: bool


# a byte position this long is past any file (and Python's int() refuses over 4300 digits: that was a 500)
_MAX_POSITION_DIGITS = 18


def _position(digits: str) -> int:
    """A byte position or count in ASCII digits (`Range`, `Content-Length`); one of more than 18 digits (leading
    zeros aside) is read as 10**18, past any file or body."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_POSITION_DIGITS else 10**_MAX_POSITION_DIGITS


def parse_range(header: str | None, size: int) -> ByteRange:
    """One `bytes=` range per RFC 9110; a malformed header is ignored (full body), an unsatisfiable one is 416."""
    full = ByteRange(0, size - 1, size, False)
    if not header:
        return full
    match = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return full  # multi-range or garbage: serving the whole body is allowed
    first, last = match.group(1), match.group(2)
    if first:
        start = _position(first)
        end = min(_position(last), size - 1) if last else size - 1
        if last and _position(last) < start:
            return full
    else:  # suffix range: the last N bytes
        n = _position(last)
        if n == 0:
            raise ApiError(416, "range_not_satisfiable", "empty suffix range", "Range", headers={"Content-Range": f"bytes */{size}"})
        start, end = max(0, size - n), size - 1
    if start >= size:
        raise ApiError(
            416, "range_not_satisfiable", f"range starts at {start} but the file has {size} bytes", "Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return ByteRange(start, end, size, True)


# -- request body limits -----------------------------------------------------------------------------------------
EDIT_PATH = "/v1/videos/edits"
_DATA_URI_PREFIX_BYTES = 64  # "data:video/quicktime;base64," and the JSON quotes around it, with room to spare


def data_uri_bytes(payload_bytes: int) -> int:
    """Length of a base64 data URI carrying `payload_bytes` (base64: 4 characters per 3 bytes, padded)."""
    return 4 * math.ceil(payload_bytes / 3) + _DATA_URI_PREFIX_BYTES


def body_limits(config: AppConfig) -> tuple[int, dict[str, int]]:
    """(default limit, {path: its own limit}): the edit route takes a source and a mask video of
    `edit.max_source_bytes` each as data URIs, plus the rest of the body (`limits.max_request_bytes`)."""
    limits = config.limits
    edit = limits.max_edit_request_bytes
    if edit is None:
        edit = 2 * data_uri_bytes(config.edit.max_source_bytes) + limits.max_request_bytes
    return limits.max_request_bytes, {EDIT_PATH: edit}


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "request_too_large", f"the request body is over this route's {limit} bytes", "body")


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 (JSON, param "body") for a request whose body is over its route's limit, counted on the bytes received, so
    a chunked body or one that lies in `Content-Length` is stopped as well. The body is read here, up to the limit,
    before the app runs (the app reads it whole anyway); the rest of an oversized body is never read."""

    def __init__(self, app: ASGIApp, default_limit: int, route_limits: Mapping[str, int] | None = None):
        self.app = app
        self.default_limit = default_limit
        self.route_limits = dict(route_limits or {})

    def limit_for(self, scope: Scope) -> int:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return self.route_limits.get(path.rstrip("/") or "/", self.default_limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        length = Headers(scope=scope).get("content-length", "").strip()
        if length.isascii() and length.isdigit() and _position(length) > limit:  # a lying one is caught by counting
            await error_response(_too_large(limit))(scope, receive, send)
            return
        try:
            buffered = await _read_body(receive, limit)
        except _BodyTooLarge:
            await error_response(_too_large(limit))(scope, receive, send)
            return
        await self.app(scope, _replay(buffered, receive), send)


async def _read_body(receive: Receive, limit: int) -> list[Message]:
    """The request's messages up to its last body chunk (or a disconnect); _BodyTooLarge once over `limit` bytes."""
    messages: list[Message] = []
    total = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages  # http.disconnect: the app sees it too
        total += len(message.get("body", b""))
        if total > limit:
            raise _BodyTooLarge
        if not message.get("more_body", False):
            return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` giving the buffered messages first, then whatever comes next (e.g. a disconnect)."""
    pending = collections.deque(messages)

    async def replayed() -> Message:
        if pending:
            return pending.popleft()
        return await receive()

    return replayed
