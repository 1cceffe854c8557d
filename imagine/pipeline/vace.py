"""Wan VACE masked video repainting as plain stages, the edit job's counterpart of encode -> denoise -> decode:

- `VaceEncoderStage`: prompt embeddings + the VACE context (VAE latents of the source outside / inside the dilated
  masks, and the packed mask) at a size the model accepts -> `VaceConditioning`;
- `VaceSampler`: the resumable sampling loop, `prepare -> step* -> finish` over a picklable `VaceState` (the same
  sampler protocol as LTX-2's `DenoiserStage`, so a denoiser pool runs either);
- `VaceDecoderStage`: VAE decode, resize back to the source size and composite over the source: pixels outside the
  (dilated) mask are the source pixels, bit for bit.

`InpaintStage` composes the three in one call (tests, benchmarks, local use). The math is diffusers'
`WanVACEPipeline.__call__` (its prompt encoding, latent statistics and scheduler are reused), restricted to one
video, no reference images; `tests/test_vace.py` checks equality with it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imagine.editing.prompts import EditInputError
from imagine.pipeline.denoise import StepHook
from imagine.pipeline.masks import check_frames, check_masks, dilate
from imagine.pipeline.types import (
    check_can_finish,
    check_can_step,
    require_components,
    scheduler_from_state,
    scheduler_state,
    tensors_to,
    tensors_to_cpu,
)

VACE_ENCODER_COMPONENTS = ["tokenizer", "text_encoder", "vae"]
VACE_SAMPLER_COMPONENTS = ["transformer", "scheduler"]
VACE_DECODER_COMPONENTS = ["vae"]
EDIT_COMPONENTS = ["tokenizer", "text_encoder", "vae", "scheduler", "transformer"]

def _feathered_alpha(masks: torch.Tensor, dilation_px: int, feather_px: int) -> torch.Tensor:
    """Blend weights (F, H, W) in [0, 1]: 1 on the mask, ramping down to exactly 0 at `dilation_px` from it.

    Box-blurring the mask dilated by `dilation_px - feather_px` with a (2 feather + 1) window reaches exactly as
    far as the full dilation, so every pixel outside `dilate(masks, dilation_px)` gets weight 0 (the source
    is kept bit for bit) and every masked pixel still gets weight 1 (when feather_px <= dilation_px / 2).
    """
    core = dilate(masks > 0.5, dilation_px - feather_px).float()
    if feather_px == 0:
        return core
    size = 2 * feather_px + 1
    padded = F.pad(core.unsqueeze(1), (feather_px,) * 4, mode="replicate")
    # separable box blur (rows, then columns)
    blurred = F.avg_pool2d(F.avg_pool2d(padded, kernel_size=(1, size), stride=1), kernel_size=(size, 1), stride=1)
    return blurred.squeeze(1).clamp_(0.0, 1.0)


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (N, C, h, w) float images; antialiased so downscaling does not alias."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)




def _check_number(name: str, value: Any, low: float, message: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise EditInputError(f"{name} must be {message}, got {value!r}")


@dataclass(frozen=True)
class EditSpec:
    """One repaint request in stage units: the text, the seed and the sampling parameters."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    conditioning_scale: float = 1.0

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    def validate(self) -> None:
        """Raise `EditInputError` naming the first field the stages cannot take."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise EditInputError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.negative_prompt, str):
            raise EditInputError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise EditInputError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise EditInputError(f"num_inference_steps must be an int >= 1, got {steps!r}")
        _check_number("guidance_scale", self.guidance_scale, 1.0, ">= 1 (1 disables CFG)")
        _check_number("conditioning_scale", self.conditioning_scale, 0.0, "a float >= 0")


@dataclass(frozen=True)
class EditGeometry:
    """Source clip vs the model's working canvas: (frames, height, width) of each."""

    num_frames: int
    height: int
    width: int
    work_height: int
    work_width: int
    padded_frames: int


@dataclass
class VaceConditioning:
    """What the sampler is conditioned on: prompt embeddings (negative too, with CFG) and the VACE context, i.e.
    [VAE(source outside mask), VAE(source inside mask)] latents + the packed mask, at the working size."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    control: torch.Tensor
    """(1, 2 z + 64, f, h, w) in the encoder's dtype."""
    geometry: EditGeometry

    @property
    def classifier_free_guidance(self) -> bool:
        return self.negative_embeds is not None

    def to_cpu(self) -> VaceConditioning:
        return tensors_to_cpu(self)


@dataclass
class VaceState:
    """A VACE sampling loop at a step boundary, resumable in another process. UniPC is a multistep solver: its
    history of model outputs is part of the state, so the scheduler's run state (plain values, see
    `scheduler_state`) travels with the latents."""

    spec: EditSpec
    latents: torch.Tensor
    """(1, z, f, h, w) float32."""
    step_index: int
    num_inference_steps: int
    scheduler: dict[str, Any]
    """The scheduler's run state after `step_index` steps (restored onto the sampler's own scheduler)."""
    geometry: EditGeometry

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_inference_steps

    def to_cpu(self) -> VaceState:
        return replace(self, latents=self.latents.detach().cpu(), scheduler=tensors_to(self.scheduler, "cpu"))


@dataclass
class VaceLatents:
    """The sampler's output: final latents (normalised, as sampled) of the working canvas."""

    latents: torch.Tensor
    geometry: EditGeometry

    def to_cpu(self) -> VaceLatents:
        return tensors_to_cpu(self)


def _latent_stats(vae: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and 1 / std, as diffusers' Wan pipelines compute them."""
    config = vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, device=device, dtype=torch.float32).view(shape)
    inv_std = 1.0 / torch.tensor(config.latents_std, device=device, dtype=torch.float32).view(shape)
    return mean, inv_std


def _vae_factors(vae: Any) -> tuple[int, int]:
    """(spatial, temporal) compression of a Wan VAE, as `WanVACEPipeline` derives them."""
    return 2 ** len(vae.config.temperal_downsample), 2 ** sum(vae.config.temperal_downsample)


class VaceEncoderStage:
    """Prompt + masked source -> `VaceConditioning`. Components: `tokenizer`, `text_encoder` (UMT5), `vae`.

    `patch_size` is the transformer's (its config; the transformer itself is not needed here). `dilation_px` grows
    the masks before repainting (`imagine.pipeline.masks.dilate`); `max_pixels` caps the working area (e.g. 832 * 480 for Wan 2.1
    VACE 1.3B, trained at 480p): larger sources are repainted at that area and upscaled into the masked region.
    """

    components = VACE_ENCODER_COMPONENTS

    def __init__(
        self,
        components: dict[str, Any],
        patch_size: tuple[int, int, int] | list[int],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        dilation_px: int = 8,
        max_pixels: int | None = None,
        max_sequence_length: int = 512,
    ):
        from diffusers import WanVACEPipeline

        require_components("VaceEncoderStage", components, VACE_ENCODER_COMPONENTS)
        if not isinstance(dilation_px, int) or dilation_px < 0:
            raise ValueError(f"dilation_px must be an int >= 0, got {dilation_px!r}")
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
            raise ValueError(f"max_pixels must be None or an int >= 1, got {max_pixels!r}")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an int >= 1, got {max_sequence_length!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.dilation_px = dilation_px
        self.max_pixels = max_pixels
        self.max_sequence_length = max_sequence_length
        self.patch = int(patch_size[1])
        self.vae = components["vae"]
        self.vae_spatial, self.vae_temporal = _vae_factors(self.vae)
        # A pipeline view over the text modules, to reuse diffusers' prompt encoding.
        self._pipe = WanVACEPipeline(
            tokenizer=components["tokenizer"], text_encoder=components["text_encoder"], vae=self.vae, scheduler=None
        )

    @property
    def spatial_multiple(self) -> int:
        """Working width/height must be multiples of this: VAE downsampling x transformer patch."""
        return self.vae_spatial * self.patch

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the model runs at for a `height` x `width` source: the nearest multiples of
        `spatial_multiple`, after scaling down to `max_pixels` if the source is larger."""
        scale = 1.0
        if self.max_pixels is not None and height * width > self.max_pixels:
            scale = math.sqrt(self.max_pixels / (height * width))
        base = self.spatial_multiple

        def snap(value: float) -> int:
            return max(base, math.floor(value * scale / base + 0.5) * base)

        return snap(height), snap(width)

    def padded_num_frames(self, num_frames: int) -> int:
        """Frames the VAE is given for a `num_frames` clip: rounded up to 1 + k * temporal compression."""
        k = self.vae_temporal
        return (num_frames - 1 + k - 1) // k * k + 1

    def _pack_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(1, 1, F', H, W) binary mask -> (1, s * s, f, h, w) VACE mask channels (diffusers' `prepare_masks`
        without reference images: each s x s pixel block becomes s * s channels, time nearest-resampled)."""
        s, k = self.vae_spatial, self.vae_temporal
        _, _, num_frames, height, width = mask.shape
        frames = (num_frames + k - 1) // k
        h, w = height // (s * self.patch) * self.patch, width // (s * self.patch) * self.patch
        packed = mask[0, 0].view(num_frames, h, s, w, s).permute(2, 4, 0, 1, 3).flatten(0, 1)
        packed = F.interpolate(packed.unsqueeze(0), size=(frames, h, w), mode="nearest-exact")
        return packed

    def _encode_context(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """VACE context latents: [VAE(video outside mask), VAE(video inside mask)] on channels, normalised.

        The same as diffusers' `WanVACEPipeline.prepare_video_latents` without reference images, except that the
        two videos go through the VAE as one batch of 2: half the encoder calls, and on CPU it takes PyTorch's
        oneDNN convolution path instead of the much slower batch-1 fallback for the VAE's few-channel conv3d layers.
        """
        vae_dtype = self.vae.dtype
        mask = mask.to(vae_dtype)
        video = video.to(vae_dtype)
        pair = torch.cat([video * (1 - mask), video * mask])
        latents = self.vae.encode(pair).latent_dist.mode()
        mean, inv_std = _latent_stats(self.vae, self.device)
        latents = ((latents.float() - mean) * inv_std).to(vae_dtype)
        inactive, reactive = latents.chunk(2)
        return torch.cat([inactive, reactive], dim=1)

    @torch.no_grad()
    def __call__(self, frames: Any, masks: Any, spec: EditSpec) -> VaceConditioning:
        """Condition a repaint of `masks` (F, H, W) in [0, 1] (> 0.5 = regenerate) of `frames` (F, H, W, 3) uint8
        or float in [0, 1]; inputs are checked before any model work."""
        source = check_frames(frames)
        masks = check_masks(masks, tuple(source.shape))
        spec.validate()
        device = self.device
        num_frames, height, width = source.shape[:3]
        work_h, work_w = self.working_size(height, width)
        padded = self.padded_num_frames(num_frames)

        region = dilate(masks > 0.5, self.dilation_px).float()  # what the model regenerates (binary, source size)
        # Model inputs: (1, C, F', h, w), video in [-1, 1], mask binary; the last frame repeats to fill F'.
        repeat_last = [num_frames - 1] * (padded - num_frames)
        index = torch.cat([torch.arange(num_frames), torch.tensor(repeat_last, dtype=torch.long)])
        video = _resize(source.to(device).permute(0, 3, 1, 2).float().div_(255.0), work_h, work_w)
        video = (video * 2.0 - 1.0)[index].permute(1, 0, 2, 3).unsqueeze(0)
        # Any coverage after antialiased downscaling counts: the repainted area never shrinks.
        model_mask = (_resize(region.to(device).unsqueeze(1), work_h, work_w) > 0).float()
        model_mask = model_mask[index].permute(1, 0, 2, 3).unsqueeze(0)

        prompt_embeds, negative_embeds = self._pipe.encode_prompt(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            do_classifier_free_guidance=spec.do_classifier_free_guidance,
            max_sequence_length=self.max_sequence_length,
            device=device,
            dtype=self.dtype,
        )
        control = torch.cat([self._encode_context(video, model_mask), self._pack_mask(model_mask)], dim=1)
        geometry = EditGeometry(num_frames, height, width, work_h, work_w, padded)
        return VaceConditioning(prompt_embeds, negative_embeds, control.to(self.dtype), geometry)


class VaceSampler:
    """The VACE sampling loop, one resumable step at a time: `prepare(spec, conditioning) -> VaceState`,
    `step(state, conditioning) -> VaceState`, `finish(state) -> VaceLatents`. Components: `transformer`
    (WanVACETransformer3DModel), `scheduler` (never mutated: each state carries its own copy)."""

    components = VACE_SAMPLER_COMPONENTS

    def __init__(self, components: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        require_components("VaceSampler", components, VACE_SAMPLER_COMPONENTS)
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = components["transformer"]
        self.scheduler = components["scheduler"]

    def _check(self, spec: EditSpec, conditioning: VaceConditioning) -> None:
        if conditioning.classifier_free_guidance != spec.do_classifier_free_guidance:
            raise ValueError(
                f"conditioning has {'a' if conditioning.classifier_free_guidance else 'no'} negative prompt but the "
                f"spec's guidance_scale {spec.guidance_scale} {'needs' if spec.do_classifier_free_guidance else 'does not use'}"
                " CFG; encode with the same spec"
            )

    @torch.no_grad()
    def prepare(self, spec: EditSpec, conditioning: VaceConditioning) -> VaceState:
        """Draw the initial noise (seeded CPU generator, diffusers' draw order) and set up the schedule."""
        from diffusers.utils.torch_utils import randn_tensor

        spec.validate()
        self._check(spec, conditioning)
        _, _, frames, height, width = conditioning.control.shape
        shape = (1, self.transformer.config.in_channels, frames, height, width)
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        scheduler = copy.deepcopy(self.scheduler)  # UniPC keeps per-run state; the shared one stays pristine
        scheduler.set_timesteps(spec.num_inference_steps, device=self.device)
        return VaceState(spec, latents, 0, len(scheduler.timesteps), scheduler_state(scheduler), conditioning.geometry)

    @torch.no_grad()
    def step(self, state: VaceState, conditioning: VaceConditioning) -> VaceState:
        """Run sampling step `state.step_index` and return the state after it (the input is not modified)."""
        check_can_step(state)
        spec = state.spec
        self._check(spec, conditioning)
        device, dtype = self.device, self.transformer.dtype
        scheduler = scheduler_from_state(self.scheduler, state.scheduler, device)
        control = conditioning.control.to(device=device, dtype=dtype)
        scale = torch.full((len(self.transformer.config.vace_layers),), float(spec.conditioning_scale), device=device, dtype=dtype)
        latents = state.latents.to(device)
        t = scheduler.timesteps[state.step_index]
        model_input = latents.to(dtype)
        timestep = t.expand(latents.shape[0])

        def predict(embeds: torch.Tensor, cache: str) -> torch.Tensor:
            with self.transformer.cache_context(cache):
                return self.transformer(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=embeds.to(device=device, dtype=dtype),
                    control_hidden_states=control,
                    control_hidden_states_scale=scale,
                    return_dict=False,
                )[0]

        noise_pred = predict(conditioning.prompt_embeds, "cond")
        if spec.do_classifier_free_guidance:
            noise_uncond = predict(conditioning.negative_embeds, "uncond")
            noise_pred = noise_uncond + spec.guidance_scale * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return replace(state, latents=latents, step_index=state.step_index + 1, scheduler=scheduler_state(scheduler))

    def finish(self, state: VaceState) -> VaceLatents:
        check_can_finish(state)
        return VaceLatents(state.latents, state.geometry)


class VaceDecoderStage:
    """Sampled latents -> repainted frames composited over the source at its own size. Components: `vae`.

    `dilation_px` must be the encoder's; `feather_px` blends the repainted region into the source over that margin.
    """

    components = VACE_DECODER_COMPONENTS

    def __init__(
        self,
        components: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        dilation_px: int = 8,
        feather_px: int = 4,
    ):
        from diffusers.video_processor import VideoProcessor

        require_components("VaceDecoderStage", components, VACE_DECODER_COMPONENTS)
        if not isinstance(dilation_px, int) or dilation_px < 0:
            raise ValueError(f"dilation_px must be an int >= 0, got {dilation_px!r}")
        if not isinstance(feather_px, int) or not 0 <= feather_px <= dilation_px // 2:
            raise ValueError(
                f"feather_px must be an int in [0, dilation_px // 2] = [0, {dilation_px // 2}] so masked pixels "
                f"keep full weight, got {feather_px!r}"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.dilation_px = dilation_px
        self.feather_px = feather_px
        self.vae = components["vae"]
        self._video_processor = VideoProcessor(vae_scale_factor=_vae_factors(self.vae)[0])

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denormalise and decode (1, C, f, h, w) latents to (F', 3, H', W') float frames in [0, 1]."""
        mean, inv_std = _latent_stats(self.vae, self.device)
        latents = (latents.to(self.device).float() / inv_std + mean).to(self.vae.dtype)
        video = self.vae.decode(latents, return_dict=False)[0]
        return self._video_processor.postprocess_video(video, output_type="pt")[0].float()

    @torch.no_grad()
    def __call__(self, sampled: VaceLatents, frames: Any, masks: Any) -> torch.Tensor:
        """uint8 (F, H, W, 3) on the CPU: the repaint inside the feathered, dilated `masks`, `frames` elsewhere."""
        source = check_frames(frames)
        masks = check_masks(masks, tuple(source.shape))
        g = sampled.geometry
        if (g.num_frames, g.height, g.width) != tuple(source.shape[:3]):
            raise EditInputError(
                f"frames are {tuple(source.shape[:3])} (F, H, W) but the latents were sampled for "
                f"{(g.num_frames, g.height, g.width)}"
            )
        device = self.device
        generated = self._decode(sampled.latents)[: g.num_frames]  # (F, 3, h, w) in [0, 1]
        generated = _resize(generated, g.height, g.width).mul_(255.0)
        alpha = _feathered_alpha(masks, self.dilation_px, self.feather_px).to(device).unsqueeze(1)
        base = source.to(device).permute(0, 3, 1, 2).float()
        blended = (base + alpha * (generated - base)).round_().clamp_(0, 255)
        # alpha is exactly 0 outside the dilated masks; `where` makes "source pixels, bit for bit" explicit.
        out = torch.where(alpha > 0, blended, base).to(torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous().cpu()


class InpaintStage:
    """The three VACE stages in one call: `stage(frames, masks, prompt, ...) -> frames` (local use, tests).

    Components: all of `EDIT_COMPONENTS`. See `VaceEncoderStage` / `VaceDecoderStage` for the options.
    """

    components = EDIT_COMPONENTS

    def __init__(
        self,
        components: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        dilation_px: int = 8,
        feather_px: int = 4,
        max_pixels: int | None = None,
        max_sequence_length: int = 512,
    ):
        require_components("InpaintStage", components, EDIT_COMPONENTS)
        self.decoder = VaceDecoderStage(components, device, dtype, dilation_px=dilation_px, feather_px=feather_px)
        self.encoder = VaceEncoderStage(
            components, components["transformer"].config.patch_size, device, dtype, dilation_px=dilation_px,
            max_pixels=max_pixels, max_sequence_length=max_sequence_length,
        )
        self.sampler = VaceSampler(components, device, dtype)
        self.dilation_px = dilation_px

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return self.encoder.working_size(height, width)

    def padded_num_frames(self, num_frames: int) -> int:
        return self.encoder.padded_num_frames(num_frames)

    def __call__(
        self,
        frames: torch.Tensor | np.ndarray,
        masks: torch.Tensor | np.ndarray,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        conditioning_scale: float = 1.0,
        step_hook: StepHook | None = None,
    ) -> torch.Tensor:
        """Repaint `masks` of `frames`; uint8 (F, H, W, 3) on the CPU, equal to the source outside the dilated masks.

        `step_hook(steps_done, total)` runs after every denoising step; an exception it raises stops sampling and
        propagates.
        """
        spec = EditSpec(prompt, negative_prompt, seed, num_inference_steps, guidance_scale, conditioning_scale)
        conditioning = self.encoder(frames, masks, spec)
        state = self.sampler.prepare(spec, conditioning)
        while not state.done:
            state = self.sampler.step(state, conditioning)
            if step_hook is not None:
                step_hook(state.step_index, state.num_inference_steps)
        return self.decoder(self.sampler.finish(state), frames, masks)
