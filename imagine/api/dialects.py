"""The API dialects Imagine speaks over ONE job store and ONE job state machine: its own (xAI's request shapes and
status words), and OpenAI's `/v1/videos` as the `openai` SDK's `client.videos` uses it. A job records the dialect it
was created through (`JobRecord.dialect`); only the schemas, the request mapping and the renderers below differ.

Status words, from Imagine's job state (`state` in Imagine's own response):

| Imagine `state` | Imagine / xAI `status` | OpenAI `status`                    |
|-----------------|------------------------|------------------------------------|
| queued          | pending                | queued                             |
| running         | pending                | in_progress                        |
| done            | done                   | completed                          |
| failed          | failed                 | failed (`error.code` says why)     |
| cancelled       | cancelled              | failed, `error.code` "cancelled"   |
| expired         | expired                | failed, `error.code` "expired"     |

Routes decide the request shape; the shared `GET /v1/videos/{id}` renders a job in the dialect it was created in;
`GET /v1/videos` (OpenAI's list) renders every job in OpenAI's shape.
"""

from __future__ import annotations

import base64
import math
from fractions import Fraction
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from imagine.api.errors import ApiError
from imagine.jobs import EditParams, JobRecord, JobStatus
from imagine.pipeline.sizing import ASPECT_RATIOS, RESOLUTIONS

DIALECTS = ("imagine", "openai", "xai")
XAI_STATUS = {
    JobStatus.QUEUED: "pending",
    JobStatus.RUNNING: "pending",
    JobStatus.DONE: "done",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
    JobStatus.EXPIRED: "expired",
}
OPENAI_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "in_progress",
    JobStatus.DONE: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "failed",
    JobStatus.EXPIRED: "failed",
}
OPENAI_FAILURE = {
    JobStatus.CANCELLED: ("cancelled", "the job was cancelled"),
    JobStatus.EXPIRED: ("expired", "the job did not start before its start deadline (X-Start-Deadline)"),
}
VARIANTS = ("video", "thumbnail", "spritesheet")
# the fields `client.videos.create` sends (multipart or JSON); anything else is refused, naming it
OPENAI_CREATE_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
SIZE_TOLERANCE = 0.03  # a size's aspect ratio may differ this much from the class it maps to


class OpenAIError(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str | None = None


class OpenAIVideo(BaseModel):
    """OpenAI's video object (`openai.types.Video`)."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    seconds: str
    size: str = Field(description="WIDTHxHEIGHT of the output (model-legal sizes: multiples of 32).")
    prompt: str | None = None
    error: OpenAIError | None = None
    remixed_from_video_id: str | None = None


class OpenAIVideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIVideo]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class Remix(BaseModel):
    """`POST /v1/videos/{id}/remix`: the same clip, changed as `prompt` says (an instruction edit)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=100_000)


def _seconds(duration: float) -> str:
    return str(int(duration)) if float(duration).is_integer() else f"{duration:g}"


def render_openai(job: JobRecord) -> OpenAIVideo:
    params = job.params
    error = None
    if job.status in OPENAI_FAILURE:
        code, message = OPENAI_FAILURE[job.status]
        error = OpenAIError(code=code, message=message, type="job_error")
    elif job.error:
        error = OpenAIError(code=job.error.get("code", "failed"), message=job.error.get("message", ""),
                            type=job.error.get("type"))
    done = job.status == JobStatus.DONE
    remixed = params.source_job_id if isinstance(params, EditParams) and job.dialect == "openai" else None
    return OpenAIVideo(
        id=job.id, model=job.model, status=OPENAI_STATUS[job.status], progress=round(job.progress * 100),
        created_at=int(job.created_at), completed_at=int(job.finished_at) if done and job.finished_at else None,
        expires_at=int(job.expires_at) if job.expires_at is not None else None, seconds=_seconds(params.duration),
        size=f"{params.width}x{params.height}", prompt=params.prompt, error=error, remixed_from_video_id=remixed,
    )


def parse_size(value: str, field: str = "size") -> tuple[str, str]:
    """OpenAI's `size` ("WIDTHxHEIGHT") -> Imagine's (resolution, aspect_ratio): the short side picks the class
    (480 or 720), the ratio the nearest aspect (within 3%); the output is that class's model-legal size."""
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise ApiError(400, "invalid_size", f"{field} must be WIDTHxHEIGHT, e.g. 1280x720, got {value!r}", field) from None
    if not (0 < width <= 8192 and 0 < height <= 8192):
        raise ApiError(400, "invalid_size", f"{field} {value!r} is out of range", field)
    short = min(width, height)
    resolution = next((name for name, px in RESOLUTIONS.items() if abs(px - short) <= px * 0.1), None)
    ratio = Fraction(width, height)
    aspect = min(ASPECT_RATIOS, key=lambda name: abs(float(ASPECT_RATIOS[name]) - float(ratio)))
    if resolution is None or abs(float(ASPECT_RATIOS[aspect]) / float(ratio) - 1) > SIZE_TOLERANCE:
        sizes = ", ".join(f"{px * 16 // 9}x{px}" for px in RESOLUTIONS.values())
        raise ApiError(
            400, "unsupported_size", f"{field} {value!r} is not served: short side {sorted(RESOLUTIONS.values())} px "
            f"and an aspect ratio of {', '.join(ASPECT_RATIOS)} (e.g. {sizes} or portrait)", field,
        )
    return resolution, aspect


def parse_seconds(value: Any, field: str = "seconds") -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, "invalid_seconds", f"{field} must be a number of seconds, got {value!r}", field) from None
    if not math.isfinite(seconds):
        raise ApiError(400, "invalid_seconds", f"{field} must be a finite number of seconds", field)
    return seconds


def upload_as_data_uri(content: bytes, content_type: str | None, fallback: str) -> str:
    """An uploaded file as the data URI the intake decodes (the bytes are sniffed there, never trusted from the
    part's Content-Type)."""
    media_type = (content_type or "").split(";")[0].strip() or fallback
    return f"data:{media_type};base64,{base64.b64encode(content).decode()}"


def openai_generation_body(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of `client.videos.create` (multipart or JSON) -> a `GenerationRequest` body (strict: a field the
    SDK never sends is refused, naming it)."""
    unknown = sorted(set(fields) - set(OPENAI_CREATE_FIELDS))
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown parameter '{unknown[0]}' for POST /v1/videos (accepted: "
                       f"{', '.join(OPENAI_CREATE_FIELDS)})", unknown[0])
    if "prompt" not in fields:
        raise ApiError(422, "missing_parameter", "'prompt' is required", "prompt")
    body: dict[str, Any] = {"prompt": fields["prompt"]}
    if fields.get("model") is not None:
        body["model"] = fields["model"]
    if fields.get("seconds") is not None:
        body["duration"] = parse_seconds(fields["seconds"])
    if fields.get("size") is not None:
        body["resolution"], body["aspect_ratio"] = parse_size(str(fields["size"]))
    reference = fields.get("input_reference")
    if reference is not None:
        if isinstance(reference, dict):
            if set(reference) - {"image_url"} or not isinstance(reference.get("image_url"), str):
                raise ApiError(400, "invalid_input_reference", "input_reference must be an image file or "
                               "{\"image_url\": URL}; file_id references are not served", "input_reference")
            body["image_url"] = reference["image_url"]
        elif isinstance(reference, str):
            body["image_url"] = reference
        else:
            raise ApiError(400, "invalid_input_reference", "input_reference must be an image file or an object "
                           "with image_url", "input_reference")
    return body


def nest_form(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Multipart fields as the SDK writes nested objects (`video[id]`, `input_reference[image_url]`) -> a dict
    (one level); a repeated field is refused."""
    out: dict[str, Any] = {}
    for name, value in items:
        if "[" in name and name.endswith("]"):
            outer, inner = name[:-1].split("[", 1)
            target = out.setdefault(outer, {})
            if not isinstance(target, dict) or inner in target:
                raise ApiError(400, "invalid_parameter", f"'{name}' is given twice or conflicts", outer)
            target[inner] = value
        else:
            if name in out:
                raise ApiError(400, "invalid_parameter", f"'{name}' is given more than once", name)
            out[name] = value
    return out
