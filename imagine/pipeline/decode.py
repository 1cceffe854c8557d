"""Decoder stage: VAE-space latents -> RGB frames (video VAE) and waveform (audio VAE -> mel -> vocoder).

Mirrors the decode tail of diffusers' `LTX2Pipeline.__call__`, including decode-time noise for VAEs with
`timestep_conditioning`, drawn from the request's seeded generator so decoding is deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imagine.pipeline.types import DecodedMedia, Latents, require_components

DECODER_COMPONENTS = ["vae", "audio_vae", "vocoder"]


class DecoderStage:
    """Decodes `Latents` into `DecodedMedia` (uint8 frames + float32 audio)."""

    components = DECODER_COMPONENTS

    def __init__(
        self,
        components: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        decode_timestep: float = 0.0,
        decode_noise_scale: float | None = None,
    ):
        from diffusers.video_processor import VideoProcessor

        require_components("DecoderStage", components, DECODER_COMPONENTS)
        if not 0.0 <= decode_timestep <= 1.0:
            raise ValueError(f"decode_timestep must be in [0, 1], got {decode_timestep}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = components["vae"]
        self.audio_vae = components["audio_vae"]
        self.vocoder = components["vocoder"]
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_timestep if decode_noise_scale is None else decode_noise_scale
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.spatial_compression_ratio)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.output_sampling_rate)

    def _check(self, latents: Latents) -> None:
        video, audio = latents.video, latents.audio
        if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != self.vae.config.latent_channels:
            raise ValueError(
                f"latents.video must be [1, {self.vae.config.latent_channels}, F, h, w], got {tuple(video.shape)}"
            )
        if audio.ndim != 4 or audio.shape[0] != 1 or audio.shape[1] != self.audio_vae.config.latent_channels:
            raise ValueError(
                f"latents.audio must be [1, {self.audio_vae.config.latent_channels}, L, M], got {tuple(audio.shape)}"
            )

    @torch.no_grad()
    def decode_video(self, latents: Latents) -> torch.Tensor:
        """Float frames (F, 3, H, W) in [0, 1], as diffusers' `output_type="pt"`."""
        from diffusers import LTX2Pipeline
        from diffusers.utils.torch_utils import randn_tensor

        self._check(latents)
        video = latents.video.to(self.device, self.dtype)
        timestep = None
        if self.vae.config.timestep_conditioning:
            # diffusers adds decode noise to the *normalized* latents, drawing from the request's generator
            generator = torch.Generator(device="cpu")
            generator.set_state(latents.generator_state)
            mean, std, scale = self.vae.latents_mean, self.vae.latents_std, self.vae.config.scaling_factor
            video = LTX2Pipeline._normalize_latents(video, mean, std, scale)
            noise = randn_tensor(video.shape, generator=generator, device=self.device, dtype=video.dtype)
            timestep = torch.tensor([self.decode_timestep], device=self.device, dtype=video.dtype)
            noise_scale = torch.tensor([self.decode_noise_scale], device=self.device, dtype=video.dtype)
            noise_scale = noise_scale[:, None, None, None, None]
            video = (1 - noise_scale) * video + noise_scale * noise
            video = LTX2Pipeline._denormalize_latents(video, mean, std, scale)
        decoded = self.vae.decode(video.to(self.vae.dtype), timestep, return_dict=False)[0]
        frames = self.video_processor.postprocess_video(decoded, output_type="pt")[0]
        if frames.shape[0] != latents.num_frames or tuple(frames.shape[2:]) != (latents.height, latents.width):
            raise ValueError(
                f"decoded video is {tuple(frames.shape)} but latents describe {latents.num_frames} frames of "
                f"{latents.width}x{latents.height}"
            )
        return frames

    @torch.no_grad()
    def decode_audio(self, latents: Latents) -> torch.Tensor:
        """Waveform (channels, samples) at `sample_rate`."""
        self._check(latents)
        audio_latents = latents.audio.to(self.device, self.audio_vae.dtype)
        mel = self.audio_vae.decode(audio_latents, return_dict=False)[0]
        return self.vocoder(mel.to(self.vocoder.dtype))[0]

    def __call__(self, latents: Latents) -> DecodedMedia:
        frames = self.decode_video(latents)
        audio = self.decode_audio(latents)
        frames_uint8 = (frames.float() * 255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return DecodedMedia(
            frames=frames_uint8,
            audio=audio.float().cpu().numpy().astype(np.float32),
            sample_rate=self.sample_rate,
            fps=latents.fps,
        )
