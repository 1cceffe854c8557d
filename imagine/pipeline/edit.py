"""Edit stage: repaint masked regions of a video with a Wan VACE model, keeping everything outside the mask.

`InpaintStage` takes frames of any size and length plus per-frame masks (1 = regenerate), runs the VACE sampling
loop one step at a time (so a step hook can report progress or stop the job) at a size the model accepts, and
composites the result back over the source at the source's own size: pixels outside the (dilated) mask are the
source pixels, bit for bit. The math is diffusers' `WanVACEPipeline.__call__` (its prompt encoding, mask packing,
latent preparation and scheduler are reused), restricted to one video, no reference images.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from imagine.pipeline.denoise import StepHook
from imagine.pipeline.grounding import dilate
from imagine.pipeline.types import require_components

EDIT_COMPONENTS = ["tokenizer", "text_encoder", "vae", "scheduler", "transformer"]

EditOp = Literal["remove", "add", "replace"]

# Generic artefacts to steer away from; a removal also names the removed object here (see `prompt_for`).
BASE_NEGATIVE_PROMPT = "blurry, distorted, deformed, low quality, artifacts, flicker, watermark, text, subtitles"


class EditInputError(ValueError):
    """Frames, masks or sampling parameters that the edit stage cannot take (the API maps it to a 4xx)."""


@dataclass(frozen=True)
class EditPrompt:
    """Text conditioning for one edit: what to paint into the masked region, and what to steer away from."""

    prompt: str
    negative_prompt: str


def prompt_for(op: EditOp, target: str, replacement: str | None = None) -> EditPrompt:
    """Prompts for an edit instruction that a parser has split into (op, target, replacement).

    - ``remove``: the masked region becomes background continuing the scene; `target` goes into the negative
      prompt so the model is pushed away from repainting the object it is removing.
    - ``add``: `target` is the object to paint into the masked region.
    - ``replace``: `replacement` is painted where `target` was; `target` is steered away from.
    """
    if op not in ("remove", "add", "replace"):
        raise EditInputError(f"op must be 'remove', 'add' or 'replace', got {op!r}")
    if not isinstance(target, str) or not target.strip():
        raise EditInputError(f"target must be a non-empty string, got {target!r}")
    target = target.strip()
    if op == "replace":
        if not isinstance(replacement, str) or not replacement.strip():
            raise EditInputError(f"replacement must be a non-empty string for op 'replace', got {replacement!r}")
        replacement = replacement.strip()
    elif replacement is not None:
        raise EditInputError(f"replacement is only used by op 'replace', got {replacement!r} for op {op!r}")

    integrate = "naturally integrated into the scene, matching its lighting, perspective, colours and motion"
    if op == "remove":
        return EditPrompt(
            prompt="empty background that seamlessly continues the surrounding scene, with consistent lighting, "
            "texture and motion",
            negative_prompt=f"{target}, {BASE_NEGATIVE_PROMPT}",
        )
    if op == "add":
        return EditPrompt(prompt=f"{target}, {integrate}", negative_prompt=BASE_NEGATIVE_PROMPT)
    return EditPrompt(prompt=f"{replacement}, {integrate}", negative_prompt=f"{target}, {BASE_NEGATIVE_PROMPT}")


def edit_prompt(instruction: dict[str, Any], text: str, negative_prompt: str = "") -> EditPrompt:
    """Prompts for a stored edit: a parsed instruction (`op`, `target`, `replacement`) goes through `prompt_for`;
    op ``inpaint`` (an explicit mask with free text that is not an instruction) paints `text` itself. The
    request's own `negative_prompt` is prepended to the derived one."""
    op = instruction.get("op")
    if op == "inpaint":
        derived = EditPrompt(prompt=text, negative_prompt=BASE_NEGATIVE_PROMPT)
    else:
        derived = prompt_for(op, instruction.get("target"), instruction.get("replacement"))
    negative = ", ".join(part for part in (negative_prompt.strip(), derived.negative_prompt) if part)
    return EditPrompt(prompt=derived.prompt, negative_prompt=negative)


def dilate_masks(masks: torch.Tensor, radius_px: int) -> torch.Tensor:
    """Grow binary (F, H, W) masks by `radius_px` pixels (square neighbourhood); float {0, 1} out.

    Why: detector/segmenter masks hug the object, so its edge pixels, shadow and compression halo would survive a
    repaint; the margin lets the model regenerate them too.
    """
    if masks.ndim != 3:
        raise EditInputError(f"masks must be (F, H, W), got shape {tuple(masks.shape)}")
    if not isinstance(radius_px, int) or radius_px < 0:
        raise EditInputError(f"radius_px must be an int >= 0, got {radius_px!r}")
    return dilate(masks > 0.5, radius_px).float()


def _feathered_alpha(masks: torch.Tensor, dilation_px: int, feather_px: int) -> torch.Tensor:
    """Blend weights (F, H, W) in [0, 1]: 1 on the mask, ramping down to exactly 0 at `dilation_px` from it.

    Box-blurring the mask dilated by `dilation_px - feather_px` with a (2 feather + 1) window reaches exactly as
    far as the full dilation, so every pixel outside `dilate_masks(masks, dilation_px)` gets weight 0 (the source
    is kept bit for bit) and every masked pixel still gets weight 1 (when feather_px <= dilation_px / 2).
    """
    core = dilate_masks(masks, dilation_px - feather_px)
    if feather_px == 0:
        return core
    size = 2 * feather_px + 1
    padded = F.pad(core.unsqueeze(1), (feather_px,) * 4, mode="replicate")
    # separable box blur (rows, then columns)
    blurred = F.avg_pool2d(F.avg_pool2d(padded, kernel_size=(1, size), stride=1), kernel_size=(size, 1), stride=1)
    return blurred.squeeze(1).clamp_(0.0, 1.0)


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value.detach()
    raise EditInputError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def _check_frames(frames: Any) -> torch.Tensor:
    """uint8 (F, H, W, 3) on the CPU from uint8 or float-in-[0, 1] frames, or an error saying what is wrong."""
    frames = _as_tensor("frames", frames)
    shape = tuple(frames.shape)
    if frames.ndim != 4 or shape[-1] != 3:
        hint = ""
        if frames.ndim == 5:
            hint = "; pass one clip without a batch dimension"
        elif frames.ndim == 4 and shape[1] == 3:
            hint = "; channels must be last (F, H, W, 3), not (F, 3, H, W)"
        raise EditInputError(f"frames must be (F, H, W, 3), got shape {shape}{hint}")
    if min(shape[:3]) < 1:
        raise EditInputError(f"frames must hold at least one frame of at least 1x1 pixels, got shape {shape}")
    if frames.dtype == torch.uint8:
        return frames.cpu()
    if not frames.is_floating_point():
        raise EditInputError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    frames = frames.float().cpu()
    if not torch.isfinite(frames).all() or frames.min() < 0.0 or frames.max() > 1.0:
        raise EditInputError("float frames must be finite and in [0, 1]")
    return (frames * 255.0).round_().to(torch.uint8)


def _check_masks(masks: Any, frames_shape: tuple[int, ...]) -> torch.Tensor:
    """float (F, H, W) in [0, 1] on the CPU matching the frames, or an error saying what is wrong."""
    masks = _as_tensor("masks", masks)
    expected = tuple(frames_shape[:3])
    shape = tuple(masks.shape)
    if shape != expected:
        hint = ""
        if masks.ndim == 4 and 1 in (shape[0], shape[1], shape[-1]):
            hint = "; drop the singleton batch/channel dimension"
        raise EditInputError(f"masks must be (F, H, W) = {expected} to match the frames, got shape {shape}{hint}")
    if masks.dtype == torch.bool:
        return masks.float().cpu()
    masks = masks.float().cpu()
    if not torch.isfinite(masks).all():
        raise EditInputError("masks must be finite")
    low, high = float(masks.min()), float(masks.max())
    if low < 0.0 or high > 1.0:
        raise EditInputError(
            f"masks must be in [0, 1] (1 = regenerate), got values in [{low:g}, {high:g}]"
            + ("; scale 0/255 masks by 1/255" if high > 1.0 else "")
        )
    if not (masks > 0.5).any():
        raise EditInputError("masks select no pixel (all <= 0.5): there is nothing to regenerate")
    return masks


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize (N, C, h, w) float images; antialiased so downscaling does not alias."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


class InpaintStage:
    """Masked video repainting with Wan VACE components: `stage(frames, masks, prompt, ...) -> frames`.

    Components: `tokenizer`, `text_encoder` (UMT5), `vae` (AutoencoderKLWan), `scheduler` (never mutated: copied
    per call, as UniPC keeps per-run history), `transformer` (WanVACETransformer3DModel).

    `dilation_px` grows the masks before repainting (see `dilate_masks`); `feather_px` blends the repainted region
    into the source over that margin. `max_pixels` caps the working area (e.g. 832 * 480 for Wan 2.1 VACE 1.3B,
    trained at 480p): larger sources are repainted at that area and the result upscaled into the masked region.
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
        from diffusers import WanVACEPipeline

        require_components("InpaintStage", components, EDIT_COMPONENTS)
        if not isinstance(dilation_px, int) or dilation_px < 0:
            raise ValueError(f"dilation_px must be an int >= 0, got {dilation_px!r}")
        if not isinstance(feather_px, int) or not 0 <= feather_px <= dilation_px // 2:
            raise ValueError(
                f"feather_px must be an int in [0, dilation_px // 2] = [0, {dilation_px // 2}] so masked pixels "
                f"keep full weight, got {feather_px!r}"
            )
        if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
            raise ValueError(f"max_pixels must be None or an int >= 1, got {max_pixels!r}")
        if not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be an int >= 1, got {max_sequence_length!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.dilation_px = dilation_px
        self.feather_px = feather_px
        self.max_pixels = max_pixels
        self.max_sequence_length = max_sequence_length
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.scheduler = components["scheduler"]
        # A pipeline view over the same modules, to reuse diffusers' prompt encoding, mask packing and latents.
        self._pipe = WanVACEPipeline(
            tokenizer=components["tokenizer"],
            text_encoder=components["text_encoder"],
            vae=self.vae,
            scheduler=self.scheduler,
            transformer=self.transformer,
        )

    @property
    def spatial_multiple(self) -> int:
        """Working width/height must be multiples of this: VAE downsampling x transformer patch."""
        return self._pipe.vae_scale_factor_spatial * self.transformer.config.patch_size[1]

    @property
    def temporal_multiple(self) -> int:
        """The VAE takes 1 + k * this frames."""
        return self._pipe.vae_scale_factor_temporal

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
        """Frames the VAE is given for a `num_frames` clip: rounded up to 1 + k * temporal_multiple."""
        k = self.temporal_multiple
        return (num_frames - 1 + k - 1) // k * k + 1

    def _check_params(
        self,
        prompt: Any,
        negative_prompt: Any,
        seed: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        conditioning_scale: Any,
    ) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise EditInputError(f"prompt must be a non-empty string, got {prompt!r}")
        if not isinstance(negative_prompt, str):
            raise EditInputError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise EditInputError(f"seed must be an int in [0, 2**63), got {seed!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise EditInputError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 1.0:
            raise EditInputError(f"guidance_scale must be >= 1 (1 disables CFG), got {guidance_scale!r}")
        if (
            not isinstance(conditioning_scale, (int, float))
            or not math.isfinite(conditioning_scale)
            or conditioning_scale < 0.0
        ):
            raise EditInputError(f"conditioning_scale must be a float >= 0, got {conditioning_scale!r}")

    @torch.no_grad()
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
        """Repaint `masks` (F, H, W) in [0, 1] (> 0.5 = regenerate) of `frames` (F, H, W, 3) uint8 or float in
        [0, 1]; return uint8 (F, H, W, 3) on the CPU, equal to the source outside the dilated masks.

        `step_hook(steps_done, total)` runs after every denoising step; an exception it raises stops sampling and
        propagates (that is how a cancelled or preempted job stops).
        """
        source = _check_frames(frames)
        masks = _check_masks(masks, tuple(source.shape))
        self._check_params(prompt, negative_prompt, seed, num_inference_steps, guidance_scale, conditioning_scale)
        pipe, device = self._pipe, self.device
        num_frames, height, width = source.shape[:3]
        work_h, work_w = self.working_size(height, width)
        padded = self.padded_num_frames(num_frames)

        region = dilate_masks(masks, self.dilation_px)  # what the model regenerates (binary, source size)
        # Model inputs: (1, C, F', h, w), video in [-1, 1], mask binary; the last frame repeats to fill F'.
        repeat_last = [num_frames - 1] * (padded - num_frames)
        index = torch.cat([torch.arange(num_frames), torch.tensor(repeat_last, dtype=torch.long)])
        video = _resize(source.to(device).permute(0, 3, 1, 2).float().div_(255.0), work_h, work_w)
        video = (video * 2.0 - 1.0)[index].permute(1, 0, 2, 3).unsqueeze(0)
        # Any coverage after antialiased downscaling counts: the repainted area never shrinks.
        model_mask = (_resize(region.to(device).unsqueeze(1), work_h, work_w) > 0).float()
        model_mask = model_mask[index].permute(1, 0, 2, 3).unsqueeze(0)

        transformer_dtype = self.transformer.dtype
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg,
            max_sequence_length=self.max_sequence_length,
            device=device,
            dtype=transformer_dtype,
        )

        generator = torch.Generator(device="cpu").manual_seed(seed)
        conditioning = self._encode_conditioning(video, model_mask)
        mask_latents = pipe.prepare_masks(model_mask, reference_images=[[]], generator=generator)
        conditioning = torch.cat([conditioning, mask_latents], dim=1).to(transformer_dtype)
        latents = pipe.prepare_latents(
            1, self.transformer.config.in_channels, work_h, work_w, padded, torch.float32, device, generator
        )
        scale = torch.full(
            (len(self.transformer.config.vace_layers),),
            float(conditioning_scale),
            device=device,
            dtype=transformer_dtype,
        )

        scheduler = copy.deepcopy(self.scheduler)  # UniPC keeps per-run state; the shared one stays pristine
        scheduler.set_timesteps(num_inference_steps, device=device)
        total = len(scheduler.timesteps)

        def predict(model_input: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, cache: str) -> torch.Tensor:
            with self.transformer.cache_context(cache):
                return self.transformer(
                    hidden_states=model_input,
                    timestep=timestep,
                    encoder_hidden_states=embeds,
                    control_hidden_states=conditioning,
                    control_hidden_states_scale=scale,
                    return_dict=False,
                )[0]

        for i, t in enumerate(scheduler.timesteps):
            model_input = latents.to(transformer_dtype)
            timestep = t.expand(latents.shape[0])
            noise_pred = predict(model_input, timestep, prompt_embeds, "cond")
            if do_cfg:
                noise_uncond = predict(model_input, timestep, negative_embeds, "uncond")
                noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if step_hook is not None:
                step_hook(i + 1, total)

        generated = self._decode(latents)[:num_frames]  # (F, 3, h, w) in [0, 1]
        generated = _resize(generated, height, width).mul_(255.0)
        alpha = _feathered_alpha(masks, self.dilation_px, self.feather_px).to(device).unsqueeze(1)
        base = source.to(device).permute(0, 3, 1, 2).float()
        blended = (base + alpha * (generated - base)).round_().clamp_(0, 255)
        # alpha is exactly 0 outside the dilated masks; `where` makes "source pixels, bit for bit" explicit.
        out = torch.where(alpha > 0, blended, base).to(torch.uint8)
        return out.permute(0, 2, 3, 1).contiguous().cpu()

    def _latent_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and 1 / std, as diffusers' Wan pipelines compute them."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=self.device, dtype=torch.float32).view(shape)
        inv_std = 1.0 / torch.tensor(config.latents_std, device=self.device, dtype=torch.float32).view(shape)
        return mean, inv_std

    def _encode_conditioning(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
        mean, inv_std = self._latent_stats()
        latents = ((latents.float() - mean) * inv_std).to(vae_dtype)
        inactive, reactive = latents.chunk(2)
        return torch.cat([inactive, reactive], dim=1)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denormalise and decode (1, C, f, h, w) latents to (F', 3, H', W') float frames in [0, 1]."""
        mean, inv_std = self._latent_stats()
        latents = (latents.float() / inv_std + mean).to(self.vae.dtype)
        video = self.vae.decode(latents, return_dict=False)[0]
        return self._pipe.video_processor.postprocess_video(video, output_type="pt")[0].float()
