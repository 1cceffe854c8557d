"""Typed, picklable values passed between the generation stages (encode -> denoise -> decode -> mux).

Every tensor here is meant to live on the CPU when it crosses a process boundary (`.to_cpu()` helpers), so a stage
can run in its own process (a Ray Serve deployment) and a `DenoiseState` can be checkpointed and resumed elsewhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import PIL.Image
import torch


def require_components(stage: str, components: dict[str, Any], names: list[str]) -> None:
    """Raise naming what is missing when a stage is built without a component it needs."""
    missing = [name for name in names if components.get(name) is None]
    if missing:
        raise ValueError(f"components: {stage} needs {names}, missing {missing}")


def tensors_to(value: Any, device: str | torch.device) -> Any:
    """`value` with every tensor in it (at any depth of lists, tuples and dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(tensors_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: tensors_to(v, device) for k, v in value.items()}
    return value


def scheduler_state(scheduler: Any, device: str | torch.device | None = None) -> dict[str, Any]:
    """A diffusers scheduler's run state (everything but its config: timesteps, sigmas, the step index and, for
    multistep solvers such as UniPC, the history of model outputs) as plain, independent values, its tensors on
    `device` when given. Plain data unpickles anywhere, without importing diffusers."""
    state = {name: copy.deepcopy(value) for name, value in vars(scheduler).items() if name != "_internal_dict"}
    return tensors_to(state, device) if device is not None else state


def scheduler_from_state(template: Any, state: dict[str, Any], device: str | torch.device) -> Any:
    """A copy of `template` (a scheduler of the same config) carrying `state` (see `scheduler_state`) on `device`."""
    scheduler = copy.deepcopy(template)
    vars(scheduler).update(tensors_to(copy.deepcopy(state), device))
    return scheduler


def check_can_step(state: Any) -> None:
    """A sampler's `step` precondition: steps are left to run (any state with `step_index` / `num_inference_steps`)."""
    if state.step_index >= state.num_inference_steps:
        raise ValueError(
            f"state.step_index is {state.step_index}: all {state.num_inference_steps} steps are already done"
        )


def check_can_finish(state: Any) -> None:
    """A sampler's `finish` precondition: every step has run."""
    if state.step_index < state.num_inference_steps:
        raise ValueError(
            f"state.step_index is {state.step_index}: {state.num_inference_steps - state.step_index} of "
            f"{state.num_inference_steps} steps are still to run"
        )


def tensors_to_cpu(obj: Any) -> Any:
    """A shallow copy of dataclass `obj` whose tensor fields (and nested stage dataclasses) are on the CPU."""
    changes: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.detach().cpu()
        elif hasattr(value, "to_cpu"):
            changes[f.name] = value.to_cpu()
    return replace(obj, **changes)


@dataclass
class GenerationSpec:
    """One generation request in model-legal units (see `imagine.pipeline.sizing.plan_video`)."""

    prompt: str
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    seed: int
    negative_prompt: str = ""
    fps: float = 24.0
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.7
    audio_guidance_scale: float | None = None
    """Audio CFG scale; None means the same as `guidance_scale`."""
    image: torch.Tensor | None = None
    """Optional first frame for image-to-video: float (3, height, width) in [0, 1] (see `prepare_image`)."""

    @property
    def effective_audio_guidance_scale(self) -> float:
        return self.guidance_scale if self.audio_guidance_scale is None else self.audio_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0 or self.effective_audio_guidance_scale > 1.0

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps

    def validate(self, spatial_multiple: int = 32, temporal_multiple: int = 8) -> None:
        """Raise ValueError naming the first field that the LTX-2 family cannot take."""
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a str, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a str, got {type(self.negative_prompt).__name__}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % spatial_multiple != 0:
                raise ValueError(f"{name} must be a positive multiple of {spatial_multiple}, got {value!r}")
        if (
            not isinstance(self.num_frames, int)
            or self.num_frames < 1
            or (self.num_frames - 1) % temporal_multiple != 0
        ):
            raise ValueError(
                f"num_frames must be {temporal_multiple}k + 1 (e.g. 9, 17, 25, ...), got {self.num_frames!r}"
            )
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {self.num_inference_steps!r}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables CFG), got {self.guidance_scale!r}")
        if self.effective_audio_guidance_scale < 1.0:
            raise ValueError(f"audio_guidance_scale must be >= 1, got {self.audio_guidance_scale!r}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.guidance_rescale!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.image is not None:
            expected = (3, self.height, self.width)
            if not isinstance(self.image, torch.Tensor) or not self.image.is_floating_point():
                raise ValueError(f"image must be a float tensor of shape {expected}, got {type(self.image).__name__}")
            if tuple(self.image.shape) != expected:
                raise ValueError(
                    f"image must have shape (3, height, width) = {expected}, got {tuple(self.image.shape)}; "
                    f"use prepare_image() to resize/crop"
                )
            if float(self.image.min()) < 0.0 or float(self.image.max()) > 1.0:
                raise ValueError("image values must be in [0, 1]")

    def to_cpu(self) -> GenerationSpec:
        return tensors_to_cpu(self)


def prepare_image(image: PIL.Image.Image, width: int, height: int, crf: int = 0) -> torch.Tensor:
    """Resize `image` to cover `width` x `height`, center-crop, and return float (3, height, width) in [0, 1].

    `crf > 0` re-compresses the frame with H.264 at that CRF first, as LTX-2 was trained on compressed conditioning
    frames (diffusers' default for Gemma-3-based LTX-2 is 33; `0` skips it).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be > 0, got {width}x{height}")
    image = image.convert("RGB")
    if crf:
        from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf

        image = PIL.Image.fromarray(apply_image_conditioning_crf(np.array(image), crf))
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), resample=PIL.Image.Resampling.LANCZOS)
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    if (left, top, resized_w, resized_h) != (0, 0, width, height):
        image = image.crop((left, top, left + width, top + height))
    # same conversion as diffusers' VaeImageProcessor.pil_to_numpy
    array = np.array(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class PromptEmbeddings:
    """Text conditioning after the LTX-2 connectors; with CFG, batch row 0 is negative and row 1 positive."""

    video_embeds: torch.Tensor
    audio_embeds: torch.Tensor
    attention_mask: torch.Tensor
    classifier_free_guidance: bool

    def to_cpu(self) -> PromptEmbeddings:
        return tensors_to_cpu(self)


@dataclass
class DenoiseState:
    """Everything needed to continue a sampling loop at a step boundary, possibly in another process.

    The scheduler is rebuilt from `schedule_sigmas` + `mu` and positioned at `step_index`; `generator_state` is the
    seeded CPU generator after the initial noise was drawn (later draws, e.g. decode noise, continue from it).
    States returned by a stage hold tensors on that stage's device: `.to_cpu()` before pickling/checkpointing.
    """

    spec: GenerationSpec
    video_latents: torch.Tensor
    """Packed video latents [B, tokens, C] (normalized, float32)."""
    audio_latents: torch.Tensor
    """Packed audio latents [B, L, C * mel] (normalized, float32)."""
    step_index: int
    """Number of completed steps (the next step to run)."""
    num_inference_steps: int
    schedule_sigmas: list[float]
    mu: float
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    latent_num_frames: int
    latent_height: int
    latent_width: int
    audio_num_frames: int
    latent_mel_bins: int
    generator_state: torch.Tensor
    conditioning_mask: torch.Tensor | None = None
    """Image-to-video only: packed [B, tokens] mask, 1 for the clean first-frame tokens."""

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_inference_steps

    def to_cpu(self) -> DenoiseState:
        return tensors_to_cpu(self)


@dataclass
class Latents:
    """Final sampler output in VAE space: what the decoder stage needs and nothing more."""

    video: torch.Tensor
    """Unpacked, denormalized video latents [B, C, F, h, w]."""
    audio: torch.Tensor
    """Unpacked, denormalized audio latents [B, C, L, M]."""
    width: int
    height: int
    num_frames: int
    fps: float
    generator_state: torch.Tensor = field(default_factory=lambda: torch.Generator().get_state())
    """State of the request's seeded CPU generator (decode-time noise continues from it, as in diffusers)."""

    def to_cpu(self) -> Latents:
        return tensors_to_cpu(self)


@dataclass
class DecodedMedia:
    """Decoded clip ready to mux."""

    frames: np.ndarray
    """uint8 (F, H, W, 3)."""
    audio: np.ndarray
    """float32 (channels, samples) in [-1, 1]."""
    sample_rate: int
    fps: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps
