"""HTTP details of the routes, apart from what they do: the create headers (`X-Priority`, `X-Start-Deadline`,
`Idempotency-Key`) as one dependency giving `CreateOptions`, and RFC 9110 `Range` parsing of content downloads."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from fastapi import Header

from imagine.api.errors import ApiError
from imagine.api.service import CreateOptions
from imagine.config import TIERS
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


def parse_range(header: str | None, size: int) -> ByteRange:
    """One `bytes=` range per RFC 9110; a malformed header is ignored (full body), an unsatisfiable one is 416."""
    full = ByteRange(0, size - 1, size, False)
    if not header:
        return full
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return full  # multi-range or garbage: serving the whole body is allowed
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return full
    else:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise ApiError(416, "range_not_satisfiable", "empty suffix range", "Range", headers={"Content-Range": f"bytes */{size}"})
        start, end = max(0, size - n), size - 1
    if start >= size:
        raise ApiError(
            416, "range_not_satisfiable", f"range starts at {start} but the file has {size} bytes", "Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return ByteRange(start, end, size, True)
