"""Request / response bodies of the HTTP API (xAI-compatible field names)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imagine.jobs.params import MAX_SEED, AspectRatio, Resolution
from imagine.pipeline.sizing import ASPECT_RATIOS, RESOLUTIONS

assert set(Resolution.__args__) == set(RESOLUTIONS) and set(AspectRatio.__args__) == set(ASPECT_RATIOS)


class MediaRef(BaseModel):
    """xAI's media object: `{"url": ...}` (an https URL or a data URI)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., min_length=1, description="An https:// URL (fetched once, safely) or a data URI.")


class GenerationRequest(BaseModel):
    """`POST /v1/videos/generations`: text (and optionally a first-frame image) to video with audio."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="What the clip shows and sounds like.", max_length=100_000)
    model: str | None = Field(None, description="Model preset; default: the server's configured model.")
    duration: float = Field(5.0, ge=1, le=15, description="Seconds of video (1-15).")
    resolution: Resolution = Field("480p", description="Short side class: 480p (864x480 at 16:9) or 720p.")
    aspect_ratio: AspectRatio = Field("16:9", description="Frame aspect ratio.")
    image_url: str | None = Field(
        None, description="First frame: an https:// URL (fetched once, with private addresses refused) or a data URI "
        "(data:image/png;base64,...)."
    )
    image: MediaRef | None = Field(None, description="xAI's form of `image_url`: {\"url\": ...}. Give one of the two.")
    reference_images: list[MediaRef] | None = Field(
        None, max_length=8, description="xAI's style / subject references: not supported by the served models "
        "(refused, naming this field)."
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="RNG seed; random when omitted (and reported).")
    negative_prompt: str | None = Field(None, description="What to steer away from.", max_length=100_000)
    num_inference_steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (1-100).")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="Classifier-free guidance (1-20).")
    fps: int | None = Field(None, ge=8, le=60, description="Frames per second (8-60); default from the model.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @model_validator(mode="after")
    def _one_image(self) -> GenerationRequest:
        if self.image is not None and self.image_url is not None:
            raise ValueError("give image_url or image, not both")
        return self

    @property
    def first_frame(self) -> tuple[str, str] | None:
        """(the first frame's URL, the field that gave it), or None."""
        if self.image_url is not None:
            return self.image_url, "image_url"
        if self.image is not None:
            return self.image.url, "image.url"
        return None


Box = tuple[float, float, float, float]


class MaskSpec(BaseModel):
    """Where to edit, instead of (or besides) words. Exactly one of the fields. Boxes are `[x0, y0, x1, y1]` in
    source pixels; a mask video is white (> 50% luma) where the clip is repainted."""

    model_config = ConfigDict(extra="forbid")

    boxes: list[Box] | None = Field(None, description="Boxes applied to every frame.", max_length=64)
    frames: dict[int, list[Box]] | None = Field(
        None, description="Per-frame boxes: frame index -> boxes; frames not listed are not edited.", max_length=10_000
    )
    video_url: str | None = Field(
        None, description="Mask video (https:// URL or data URI), same size and frame count as the source."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> MaskSpec:
        given = [name for name in ("boxes", "frames", "video_url") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of boxes, frames, video_url (got {', '.join(given) or 'none'})")
        if self.boxes is not None and not self.boxes:
            raise ValueError("boxes must not be empty")
        return self


class EditRequest(BaseModel):
    """`POST /v1/videos/edits`: an instruction applied to an existing clip (ours by id, or uploaded)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        ..., description="The instruction: 'remove the man in the background', 'add a tree on the left', "
        "'replace the car with a red bus', '移除背景中走过的行人'.", max_length=100_000
    )
    video_id: str | None = Field(None, description="A done job of yours whose video is edited.", max_length=64)
    video_url: str | None = Field(
        None, description="The source video: an https:// URL (fetched once, safely) or a data URI "
        "(data:video/mp4;base64,...)."
    )
    video: MediaRef | None = Field(None, description="xAI's form of `video_url`: {\"url\": ...}.")
    mask: MaskSpec | None = Field(None, description="Explicit region: skips grounding.")
    model: str | None = Field(None, description="Edit model preset; default: the server's edit model.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="RNG seed; random when omitted (and reported).")
    negative_prompt: str | None = Field(None, description="What to steer away from.", max_length=100_000)
    num_inference_steps: int | None = Field(None, ge=1, le=100, description="Denoising steps (1-100).")
    guidance_scale: float | None = Field(None, ge=1.0, le=20.0, description="Classifier-free guidance (1-20).")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty: say what to change, e.g. 'remove the dog'")
        return value

    @model_validator(mode="after")
    def _one_video(self) -> EditRequest:
        if self.video is not None and self.video_url is not None:
            raise ValueError("give video_url or video, not both")
        return self

    @property
    def source_url(self) -> tuple[str, str] | None:
        """(the uploaded source's URL, the field that gave it), or None (a `video_id` edit)."""
        if self.video_url is not None:
            return self.video_url, "video_url"
        if self.video is not None:
            return self.video.url, "video.url"
        return None


class CreatedResponse(BaseModel):
    request_id: str


class VideoInfo(BaseModel):
    url: str | None = Field(
        description="Where to download the MP4: a presigned URL of the artifact store (no API key needed, until "
        "`expires_at`), or this API's `/v1/videos/{id}/content` (with the API key); null once the video expired "
        "(retention deleted it)."
    )
    expires_at: float | None = Field(
        None, description="When `url` stops working (unix s): a presigned URL's expiry, or the job's retention "
        "expiry if sooner; None: no expiry."
    )
    duration: float
    width: int
    height: int
    fps: float
    has_audio: bool = True


class ErrorInfo(BaseModel):
    type: str
    code: str
    message: str


class Usage(BaseModel):
    """Measured usage of a job: device time and its cost; output seconds and price only once done."""

    output_seconds: float
    device_seconds: float
    cost_usd: float
    price_usd: float


class JobResponse(BaseModel):
    """`GET /v1/videos/{id}`."""

    id: str
    request_id: str
    object: str = "video"
    kind: str
    model: str
    priority: Literal["realtime", "standard", "batch"] = Field(description="The job's effective priority tier.")
    status: Literal["pending", "done", "failed", "cancelled", "expired"] = Field(
        description="xAI's status words: pending (queued or running) until done, failed, cancelled or expired."
    )
    state: Literal["queued", "running", "done", "failed", "cancelled", "expired"] = Field(
        description="Imagine's job state: `pending` split into queued and running."
    )
    progress: float
    created_at: float
    started_at: float | None
    finished_at: float | None
    deadline_at: float | None = Field(None, description="Start deadline (unix s); still queued then -> expired.")
    expires_at: float | None = Field(
        None, description="When a done job's video is deleted (unix s; `retention.outputs_ttl_s` after it was done); "
        "afterwards its content answers 410 and the job stays. None: kept."
    )
    video: VideoInfo | None = None
    error: ErrorInfo | None = None
    usage: Usage | None = Field(None, description="Device-seconds, cost and (done jobs only) price, from the ledger.")
    request: dict[str, Any] = Field(default_factory=dict, description="The resolved request parameters.")


class ModelInfo(BaseModel):
    id: str
    object: str = "model"
    family: str
    description: str
    default: bool
    max_duration: float
    default_fps: float
    default_steps: int
