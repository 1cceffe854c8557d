"""Denoiser stage: the LTX-2 joint video + audio sampling loop, one resumable step at a time.

Same math and the same random draws as diffusers' `LTX2Pipeline` / `LTX2ImageToVideoPipeline` `__call__` (its
latent preparation, timestep schedule, CFG with guidance rescale and Euler steps are reused from diffusers), split
into `prepare` -> `step` x N -> `finish` so the loop can be checkpointed, preempted and resumed in another process
from a `DenoiseState`.

Not supported (left disabled, as with diffusers' `stg_scale=0`, `modality_scale=1`): spatio-temporal guidance (STG)
and modality-isolation guidance; each would add a transformer forward pass per step.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable

import numpy as np
import torch

from imagine.pipeline.types import (
    DenoiseState,
    GenerationSpec,
    Latents,
    PromptEmbeddings,
    check_can_finish,
    check_can_step,
    require_components,
)

DENOISER_COMPONENTS = ["transformer", "scheduler", "vae", "audio_vae"]

StepHook = Callable[[int, int], None]


def _velocity_to_x0(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sample - velocity * sigma


def _x0_to_velocity(sample: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (sample - x0) / sigma


class DenoiserStage:
    """Runs the LTX-2 sampler: `prepare(spec, embeddings)`, `step(state, embeddings)`, `finish(state)`.

    Components: `transformer`, `scheduler` (a FlowMatchEulerDiscreteScheduler; never mutated, copied per step),
    `vae` (image-to-video first-frame encoding, latent mean/std, compression ratios) and `audio_vae` (latent
    shapes and mean/std only).
    """

    components = DENOISER_COMPONENTS

    def __init__(
        self,
        components: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        use_cross_timestep: bool = True,
    ):
        from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline

        require_components("DenoiserStage", components, DENOISER_COMPONENTS)
        self.device = torch.device(device)
        self.dtype = dtype
        self.use_cross_timestep = use_cross_timestep
        self.transformer = components["transformer"]
        self.scheduler = components["scheduler"]
        self.vae = components["vae"]
        self.audio_vae = components["audio_vae"]
        # Pipeline views over the same modules, to reuse diffusers' latent preparation and (un)packing helpers.
        modules = dict(
            scheduler=self.scheduler,
            vae=self.vae,
            audio_vae=self.audio_vae,
            text_encoder=None,
            tokenizer=None,
            connectors=None,
            transformer=self.transformer,
            vocoder=None,
        )
        self._t2v = LTX2Pipeline(**modules)
        self._i2v = LTX2ImageToVideoPipeline(**modules)

    @property
    def spatial_compression_ratio(self) -> int:
        return self._t2v.vae_spatial_compression_ratio

    @property
    def temporal_compression_ratio(self) -> int:
        return self._t2v.vae_temporal_compression_ratio

    def validate(self, spec: GenerationSpec) -> None:
        spec.validate(self.spatial_compression_ratio, self.temporal_compression_ratio)

    def _check_embeddings(self, spec: GenerationSpec, embeddings: PromptEmbeddings) -> None:
        if embeddings.classifier_free_guidance != spec.do_classifier_free_guidance:
            raise ValueError(
                f"embeddings.classifier_free_guidance is {embeddings.classifier_free_guidance} but the spec's guidance "
                f"scales ({spec.guidance_scale}, audio {spec.effective_audio_guidance_scale}) "
                f"{'need' if spec.do_classifier_free_guidance else 'do not use'} CFG; encode with "
                f"guidance={spec.do_classifier_free_guidance}"
            )

    def _scheduler_at(self, schedule_sigmas: list[float], mu: float, num_steps: int, step_index: int = 0):
        """A fresh copy of the scheduler with the request's timesteps (diffusers' `retrieve_timesteps`) at a step."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import retrieve_timesteps

        scheduler = copy.deepcopy(self.scheduler)
        retrieve_timesteps(scheduler, num_steps, self.device, None, sigmas=schedule_sigmas, mu=mu)
        scheduler.set_begin_index(step_index)
        return scheduler

    def _resume_scheduler(self, state: DenoiseState):
        scheduler = self._scheduler_at(state.schedule_sigmas, state.mu, state.num_inference_steps, state.step_index)
        if not torch.equal(scheduler.timesteps.cpu(), state.timesteps.cpu()):
            raise ValueError(
                "state.timesteps do not match the schedule rebuilt by this stage's scheduler; the state was made "
                "with a different scheduler config"
            )
        return scheduler

    @torch.no_grad()
    def prepare(self, spec: GenerationSpec, embeddings: PromptEmbeddings) -> DenoiseState:
        """Draw the initial noise (seeded CPU generator, diffusers' draw order) and set up the schedule."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import calculate_shift

        self.validate(spec)
        self._check_embeddings(spec, embeddings)
        pipe = self._t2v
        device = self.device
        generator = torch.Generator(device="cpu").manual_seed(spec.seed)

        latent_num_frames = (spec.num_frames - 1) // pipe.vae_temporal_compression_ratio + 1
        latent_height = spec.height // pipe.vae_spatial_compression_ratio
        latent_width = spec.width // pipe.vae_spatial_compression_ratio
        num_channels_latents = self.transformer.config.in_channels
        conditioning_mask = None
        if spec.image is None:
            video_latents = pipe.prepare_latents(
                1, num_channels_latents, spec.height, spec.width, spec.num_frames, 0.0, torch.float32, device,
                generator, None,
            )
        else:
            image = self._i2v.video_processor.normalize(spec.image.unsqueeze(0))
            image = image.to(device=device, dtype=embeddings.video_embeds.dtype)
            video_latents, conditioning_mask = self._i2v.prepare_latents(
                image, 1, num_channels_latents, spec.height, spec.width, spec.num_frames, 0.0, torch.float32,
                device, generator, None,
            )

        audio_latents_per_second = (
            pipe.audio_sampling_rate / pipe.audio_hop_length / float(pipe.audio_vae_temporal_compression_ratio)
        )
        audio_num_frames = round(spec.duration_s * audio_latents_per_second)
        num_mel_bins = self.audio_vae.config.mel_bins
        latent_mel_bins = num_mel_bins // pipe.audio_vae_mel_compression_ratio
        audio_latents = pipe.prepare_audio_latents(
            1,
            num_channels_latents=self.audio_vae.config.latent_channels,
            audio_latent_length=audio_num_frames,
            num_mel_bins=num_mel_bins,
            noise_scale=0.0,
            dtype=torch.float32,
            device=device,
            generator=generator,
            latents=None,
        )

        n = spec.num_inference_steps
        schedule_sigmas = [float(s) for s in np.linspace(1.0, 1 / n, n)]
        config = self.scheduler.config
        mu = calculate_shift(
            video_latents.shape[1],
            config.get("base_image_seq_len", 1024),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.95),
            config.get("max_shift", 2.05),
        )
        scheduler = self._scheduler_at(schedule_sigmas, mu, n)
        return DenoiseState(
            spec=spec,
            video_latents=video_latents,
            audio_latents=audio_latents,
            step_index=0,
            num_inference_steps=len(scheduler.timesteps),
            schedule_sigmas=schedule_sigmas,
            mu=float(mu),
            timesteps=scheduler.timesteps.clone(),
            sigmas=scheduler.sigmas.clone(),
            latent_num_frames=latent_num_frames,
            latent_height=latent_height,
            latent_width=latent_width,
            audio_num_frames=audio_num_frames,
            latent_mel_bins=latent_mel_bins,
            generator_state=generator.get_state(),
            conditioning_mask=conditioning_mask,
        )

    @torch.no_grad()
    def step(self, state: DenoiseState, embeddings: PromptEmbeddings) -> DenoiseState:
        """Run sampling step `state.step_index` and return the state after it (the input is not modified)."""
        from diffusers.pipelines.ltx2.pipeline_ltx2 import rescale_noise_cfg
        from diffusers.pipelines.ltx2.utils import conditioning_frame_rate

        check_can_step(state)
        spec = state.spec
        self._check_embeddings(spec, embeddings)
        pipe = self._t2v
        device = self.device
        i = state.step_index
        cfg = embeddings.classifier_free_guidance
        # Two copies of the schedule positioned at step i: video and audio (scheduler.step advances its index).
        video_scheduler = self._resume_scheduler(state)
        audio_scheduler = self._resume_scheduler(state)
        t = video_scheduler.timesteps[i]
        sigma = video_scheduler.sigmas[i]
        audio_sigma = audio_scheduler.sigmas[i]

        latents = state.video_latents.to(device)
        audio_latents = state.audio_latents.to(device)
        video_embeds = embeddings.video_embeds.to(device)
        audio_embeds = embeddings.audio_embeds.to(device)
        attention_mask = embeddings.attention_mask.to(device)
        embeds_dtype = video_embeds.dtype
        fps = conditioning_frame_rate(spec.fps, 1.0)

        video_coords = self.transformer.rope.prepare_video_coords(
            latents.shape[0], state.latent_num_frames, state.latent_height, state.latent_width, device, fps=fps
        )
        audio_coords = self.transformer.audio_rope.prepare_audio_coords(
            audio_latents.shape[0], state.audio_num_frames, device
        )
        if cfg:
            video_coords = video_coords.repeat((2,) + (1,) * (video_coords.ndim - 1))
            audio_coords = audio_coords.repeat((2,) + (1,) * (audio_coords.ndim - 1))

        latent_model_input = (torch.cat([latents] * 2) if cfg else latents).to(embeds_dtype)
        audio_model_input = (torch.cat([audio_latents] * 2) if cfg else audio_latents).to(embeds_dtype)
        timestep = t.expand(latent_model_input.shape[0])
        if state.conditioning_mask is not None:
            conditioning_mask = state.conditioning_mask.to(device)
            if cfg:
                conditioning_mask = torch.cat([conditioning_mask, conditioning_mask])
            # first-frame tokens are clean: per-token timestep 0 there
            timestep_kwargs = {
                "timestep": timestep.unsqueeze(-1) * (1 - conditioning_mask),
                "audio_timestep": timestep,
            }
        else:
            timestep_kwargs = {"timestep": timestep}

        with self.transformer.cache_context("cond_uncond"):
            noise_pred_video, noise_pred_audio = self.transformer(
                hidden_states=latent_model_input,
                audio_hidden_states=audio_model_input,
                encoder_hidden_states=video_embeds,
                audio_encoder_hidden_states=audio_embeds,
                **timestep_kwargs,
                sigma=timestep,
                encoder_attention_mask=attention_mask,
                audio_encoder_attention_mask=attention_mask,
                num_frames=state.latent_num_frames,
                height=state.latent_height,
                width=state.latent_width,
                fps=fps,
                audio_num_frames=state.audio_num_frames,
                video_coords=video_coords,
                audio_coords=audio_coords,
                isolate_modalities=False,
                spatio_temporal_guidance_blocks=None,
                perturbation_mask=None,
                use_cross_timestep=self.use_cross_timestep,
                return_dict=False,
            )
        noise_pred_video = noise_pred_video.float()
        noise_pred_audio = noise_pred_audio.float()

        # CFG in x0 space with the delta formulation, then guidance rescale (as LTX2Pipeline does).
        if cfg:
            video_uncond, video_cond = noise_pred_video.chunk(2)
            video_cond = _velocity_to_x0(latents, video_cond, sigma)
            video_uncond = _velocity_to_x0(latents, video_uncond, sigma)
            video_guided = video_cond + (spec.guidance_scale - 1) * (video_cond - video_uncond)
            audio_uncond, audio_cond = noise_pred_audio.chunk(2)
            audio_cond = _velocity_to_x0(audio_latents, audio_cond, audio_sigma)
            audio_uncond = _velocity_to_x0(audio_latents, audio_uncond, audio_sigma)
            audio_guided = audio_cond + (spec.effective_audio_guidance_scale - 1) * (audio_cond - audio_uncond)
        else:
            video_cond = video_guided = _velocity_to_x0(latents, noise_pred_video, sigma)
            audio_cond = audio_guided = _velocity_to_x0(audio_latents, noise_pred_audio, audio_sigma)
        if spec.guidance_rescale > 0:
            video_x0 = rescale_noise_cfg(video_guided, video_cond, guidance_rescale=spec.guidance_rescale)
            audio_x0 = rescale_noise_cfg(audio_guided, audio_cond, guidance_rescale=spec.guidance_rescale)
        else:
            video_x0, audio_x0 = video_guided, audio_guided

        if state.conditioning_mask is None:
            velocity = _x0_to_velocity(latents, video_x0, sigma)
            latents = video_scheduler.step(velocity, t, latents, return_dict=False)[0]
        else:
            # Image-to-video: step only the frames after the (clean) first latent frame.
            shape = (state.latent_num_frames, state.latent_height, state.latent_width)
            patch = (self.transformer.config.patch_size, self.transformer.config.patch_size_t)
            video_x0 = pipe._unpack_latents(video_x0, *shape, *patch)
            latents = pipe._unpack_latents(latents, *shape, *patch)
            velocity = _x0_to_velocity(latents, video_x0, sigma)
            stepped = video_scheduler.step(velocity[:, :, 1:], t, latents[:, :, 1:], return_dict=False)[0]
            latents = pipe._pack_latents(torch.cat([latents[:, :, :1], stepped], dim=2), *patch)
        audio_velocity = _x0_to_velocity(audio_latents, audio_x0, audio_sigma)
        audio_latents = audio_scheduler.step(audio_velocity, t, audio_latents, return_dict=False)[0]

        return replace(state, video_latents=latents, audio_latents=audio_latents, step_index=i + 1)

    @torch.no_grad()
    def finish(self, state: DenoiseState) -> Latents:
        """Unpack and denormalize the sampled latents into VAE space."""
        check_can_finish(state)
        pipe = self._t2v
        patch = (self.transformer.config.patch_size, self.transformer.config.patch_size_t)
        video = pipe._unpack_latents(
            state.video_latents, state.latent_num_frames, state.latent_height, state.latent_width, *patch
        )
        video = pipe._denormalize_latents(
            video, self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
        )
        audio = pipe._denormalize_audio_latents(
            state.audio_latents, self.audio_vae.latents_mean, self.audio_vae.latents_std
        )
        audio = pipe._unpack_audio_latents(audio, state.audio_num_frames, num_mel_bins=state.latent_mel_bins)
        spec = state.spec
        return Latents(
            video=video,
            audio=audio,
            width=spec.width,
            height=spec.height,
            num_frames=spec.num_frames,
            fps=spec.fps,
            generator_state=state.generator_state,
        )

    def __call__(
        self, spec: GenerationSpec, embeddings: PromptEmbeddings, step_hook: StepHook | None = None
    ) -> Latents:
        """Run the whole loop; `step_hook(steps_done, total)` runs after every step and may raise to stop it."""
        state = self.prepare(spec, embeddings)
        while not state.done:
            state = self.step(state, embeddings)
            if step_hook is not None:
                step_hook(state.step_index, state.num_inference_steps)
        return self.finish(state)
