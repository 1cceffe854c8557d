"""Typed per-request job parameters: built once at intake (`imagine.api.service`), stored as JSON in the `jobs.params`
column, loaded back typed by the job store. Every later reader (scheduler, replicas, ledger) reads attributes of
these models, never string keys of a dict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

JobKind = Literal["generation", "edit"]
Resolution = Literal["480p", "720p"]
AspectRatio = Literal["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3"]
MAX_SEED = 2**32 - 1


class _Params(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerationParams(_Params):
    """A text (and optional first-frame image) -> video job, resolved: defaults filled in, sizes model-legal."""

    prompt: str = Field(description="What the clip shows and sounds like.")
    negative_prompt: str = Field(description="What to steer away from ('' for nothing).")
    duration: float = Field(gt=0, description="Requested seconds of video (what daily quotas count).")
    resolution: Resolution = Field(description="Short-side class (price list key).")
    aspect_ratio: AspectRatio = Field(description="Frame aspect ratio as requested.")
    seed: int = Field(ge=0, le=MAX_SEED, description="RNG seed (chosen at intake when the request gave none).")
    num_inference_steps: int = Field(ge=1, description="Denoising steps.")
    guidance_scale: float = Field(gt=0, description="Classifier-free guidance scale.")
    fps: float = Field(gt=0, description="Frames per second of the output.")
    width: int = Field(gt=0, description="Model-legal frame width in pixels.")
    height: int = Field(gt=0, description="Model-legal frame height in pixels.")
    num_frames: int = Field(gt=0, description="Model-legal frame count (8k + 1 for LTX-2).")
    image_key: str | None = Field(description="Artifact key of the first-frame PNG; None: text only.")


class EditPlace(_Params):
    """Where an edit happens, as the instruction parser found it (`imagine.editing.instructions.Place`)."""

    phrase: str = Field(description="The place phrase as written, e.g. 'in the background'.")
    kind: str = Field(description="An absolute position ('left', 'background', ...) or a relation ('near', ...).")
    anchors: tuple[str, ...] = Field((), description="Object phrases a relative place refers to.")


class EditInstruction(_Params):
    """The parsed instruction (`imagine.editing.instructions.EditInstruction`), or `inpaint` when an explicit mask
    came with free text (the text is then the repaint prompt of that region)."""

    op: Literal["remove", "add", "replace", "inpaint"] = Field(description="What to do.")
    target: str | None = Field(None, description="remove/replace: the object to find; add: the object to paint.")
    replacement: str | None = Field(None, description="replace: what the target becomes; inpaint: the prompt.")
    place: EditPlace | None = Field(None, description="Where, when the instruction says.")
    language: Literal["en", "zh"] | None = Field(None, description="The instruction's language (None: inpaint).")
    text: str | None = Field(None, description="The text the rules parsed (None: inpaint).")


class EditMask(_Params):
    """An explicit edit region, validated against the source at intake: exactly one of the three forms. Boxes are
    `[x0, y0, x1, y1]` in source pixels; `video` means the mask video stored under `EditParams.mask_key`."""

    boxes: list[list[float]] | None = Field(None, description="Boxes applied to every frame.")
    frames: dict[int, list[list[float]]] | None = Field(None, description="Frame index -> boxes (others unedited).")
    video: bool = Field(False, description="A mask video was uploaded (white = repaint).")

    @model_validator(mode="after")
    def _exactly_one(self) -> EditMask:
        given = [name for name, on in (("boxes", self.boxes is not None), ("frames", self.frames is not None),
                                       ("video", self.video)) if on]
        if len(given) != 1:
            raise ValueError(f"an edit mask is exactly one of boxes, frames, video; got {given or 'none'}")
        return self


class EditParams(_Params):
    """An instruction (or mask) applied to a source clip; the output keeps the source's size, frames, rate and audio."""

    prompt: str = Field(description="The instruction as the client wrote it.")
    instruction: EditInstruction = Field(description="The parsed instruction.")
    negative_prompt: str = Field(description="What to steer away from ('' for nothing).")
    seed: int = Field(ge=0, le=MAX_SEED, description="RNG seed (chosen at intake when the request gave none).")
    num_inference_steps: int = Field(ge=1, description="Denoising steps.")
    guidance_scale: float = Field(gt=0, description="Classifier-free guidance scale.")
    source_job_id: str | None = Field(description="The done job whose video is edited; None: an uploaded source.")
    source_key: str = Field(description="Artifact key of the source MP4.")
    width: int = Field(gt=0, description="Source frame width in pixels.")
    height: int = Field(gt=0, description="Source frame height in pixels.")
    num_frames: int = Field(gt=0, description="Source frame count.")
    fps: float = Field(gt=0, description="Source frame rate.")
    duration: float = Field(gt=0, description="Source seconds (what daily quotas count).")
    resolution: Resolution = Field(description="Price-list class of the source (by its short side).")
    source_has_audio: bool = Field(description="The source has an audio track (copied to the output).")
    mask: EditMask | None = Field(description="Explicit region; None: grounding finds it from the instruction.")
    mask_key: str | None = Field(description="Artifact key of the mask video (exactly when `mask.video`).")

    @model_validator(mode="after")
    def _mask_video_is_stored(self) -> EditParams:
        if (self.mask is not None and self.mask.video) != (self.mask_key is not None):
            raise ValueError(f"mask_key must be set exactly when the mask is a video (mask={self.mask}, "
                             f"mask_key={self.mask_key!r})")
        return self


JobParams = GenerationParams | EditParams
PARAMS_BY_KIND: dict[str, type[JobParams]] = {"generation": GenerationParams, "edit": EditParams}


def params_type(kind: str) -> type[JobParams]:
    """The params model of a job kind; ValueError naming the known kinds for any other."""
    try:
        return PARAMS_BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown job kind {kind!r}; known: {sorted(PARAMS_BY_KIND)}") from None


def params_for(kind: str, data: Mapping[str, Any]) -> JobParams:
    """`data` (a stored params JSON object) validated as the params of `kind` (pydantic ValidationError if it
    does not fit; ValueError for an unknown kind)."""
    return params_type(kind).model_validate(data)
