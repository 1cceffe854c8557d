"""Decoder stage: VAE-space latents -> RGB frames (video VAE) and waveform (audio VAE -> mel -> vocoder).

Mirrors the decode tail of diffusers' `LTX2Pipeline.__call__`, including decode-time noise for VAEs with
`timestep_conditioning`, drawn from the request's seeded generator so decoding is deterministic.

Long or large clips are decoded in overlapping spatio-temporal tiles (`TilingConfig`, `decode_tiled`) so the decoder
never holds the whole clip's activations: only one tile's, plus the output frames. diffusers' own
`AutoencoderKLLTX2Video` tiling is not used: its temporal path (`use_framewise_decoding`, which `enable_tiling` does
not switch on) drops the last frame of every later tile where it should drop the first, so from the second temporal
tile on its output runs one frame late (frame f shows frame f - 1; checked with a context-free decoder, whose tiled
decode must equal the whole one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imagine.config import TilingConfig
from imagine.pipeline.types import DecodedMedia, Latents, require_components

DECODER_COMPONENTS = ["vae", "audio_vae", "vocoder"]


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) latent spans of `tile` (the last may be shorter), `overlap` apart, covering `length`."""
    spans = [(0, min(tile, length))]
    while spans[-1][1] < length:
        start = spans[-1][1] - overlap
        spans.append((start, min(start + tile, length)))
    return spans


def _blend_weights(spans: list[tuple[int, int]], size: int) -> list[torch.Tensor]:
    """Per-tile 1-D weights over output spans [start, end) of a dimension of `size`: linear ramps across each overlap
    with a neighbour, normalized so the tiles' weights sum to 1 at every position."""
    ramps = []
    for k, (start, end) in enumerate(spans):
        ramp = torch.ones(end - start, dtype=torch.float64)
        if k > 0:  # rise across the overlap with the previous tile
            shared = spans[k - 1][1] - start
            ramp[:shared] = torch.arange(1, shared + 1, dtype=torch.float64) / (shared + 1)
        if k + 1 < len(spans):  # fall across the overlap with the next tile
            shared = end - spans[k + 1][0]
            ramp[end - start - shared :] = torch.arange(shared, 0, -1, dtype=torch.float64) / (shared + 1)
        ramps.append(ramp)
    total = torch.zeros(size, dtype=torch.float64)
    for (start, end), ramp in zip(spans, ramps):
        total[start:end] += ramp
    return [(ramp / total[start:end]).float() for (start, end), ramp in zip(spans, ramps)]


@torch.no_grad()
def decode_tiled(vae: Any, latents: torch.Tensor, timestep: torch.Tensor | None, tiling: TilingConfig) -> torch.Tensor:
    """Decode video latents [B, C, F, h, w] with `vae.decode` one spatio-temporal tile at a time and cross-fade the
    tiles into the output [B, 3, (F - 1) * t + 1, h * s, w * s] (s, t: the VAE's spatial / temporal compression).

    A tile of latent frames [a, b) decodes to output frames [t * a, t * (b - 1)]: its first latent frame is decoded
    as a clip start, i.e. to the single last frame of that latent's group, which is where it lines up with the
    whole-clip decode. That frame lacks the past context, and sits at the weak start of the cross-fade.
    """
    spatial, temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    tile_hw, overlap_hw, tile_t, overlap_t = tiling.latent_tiles(spatial, temporal)
    _, _, frames, height, width = latents.shape
    t_spans, h_spans, w_spans = (
        _tile_spans(frames, tile_t, overlap_t),
        _tile_spans(height, tile_hw, overlap_hw),
        _tile_spans(width, tile_hw, overlap_hw),
    )
    out_t = [(temporal * a, temporal * (b - 1) + 1) for a, b in t_spans]
    out_h = [(spatial * a, spatial * b) for a, b in h_spans]
    out_w = [(spatial * a, spatial * b) for a, b in w_spans]
    weights_t = _blend_weights(out_t, temporal * (frames - 1) + 1)
    weights_h = _blend_weights(out_h, spatial * height)
    weights_w = _blend_weights(out_w, spatial * width)

    output: torch.Tensor | None = None
    for (ta, tb), (fa, fb), wt in zip(t_spans, out_t, weights_t):
        for (ha, hb), (ya, yb), wh in zip(h_spans, out_h, weights_h):
            for (wa, wb), (xa, xb), ww in zip(w_spans, out_w, weights_w):
                tile = vae.decode(latents[:, :, ta:tb, ha:hb, wa:wb], timestep, return_dict=False)[0]
                if tuple(tile.shape[2:]) != (fb - fa, yb - ya, xb - xa):
                    raise ValueError(
                        f"vae decoded latent tile {tuple(latents[:, :, ta:tb, ha:hb, wa:wb].shape)} to "
                        f"{tuple(tile.shape)}, expected {(fb - fa, yb - ya, xb - xa)} output frames x pixels"
                    )
                if output is None:
                    size = (temporal * (frames - 1) + 1, spatial * height, spatial * width)
                    output = torch.zeros(*tile.shape[:2], *size, dtype=torch.float32, device=tile.device)
                weight = (wt[:, None, None] * wh[None, :, None] * ww[None, None, :]).to(tile.device)
                output[:, :, fa:fb, ya:yb, xa:xb] += tile.float() * weight
                dtype = tile.dtype
    assert output is not None  # at least one tile
    return output.to(dtype)


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
        tiling: bool | TilingConfig = True,
    ):
        """`tiling`: True decodes clips larger than one default `TilingConfig` tile in overlapping tiles (smaller
        clips decode whole, unchanged), a `TilingConfig` sets the tile sizes, False always decodes the whole clip."""
        from diffusers.video_processor import VideoProcessor

        require_components("DecoderStage", components, DECODER_COMPONENTS)
        if not 0.0 <= decode_timestep <= 1.0:
            raise ValueError(f"decode_timestep must be in [0, 1], got {decode_timestep}")
        if isinstance(tiling, bool):
            tiling = TilingConfig() if tiling else None
        elif not isinstance(tiling, TilingConfig):
            raise TypeError(f"tiling must be a bool or a TilingConfig, got {type(tiling).__name__}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae = components["vae"]
        self.audio_vae = components["audio_vae"]
        self.vocoder = components["vocoder"]
        self.decode_timestep = decode_timestep
        self.decode_noise_scale = decode_timestep if decode_noise_scale is None else decode_noise_scale
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.spatial_compression_ratio)
        self.tiling: TilingConfig | None = tiling
        self._latent_tiles = (
            None
            if tiling is None
            else tiling.latent_tiles(self.vae.spatial_compression_ratio, self.vae.temporal_compression_ratio)
        )

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

    def needs_tiling(self, latent_shape: tuple[int, ...] | torch.Size) -> bool:
        """Whether video latents of this [B, C, F, h, w] shape are decoded in tiles (larger than one tile)."""
        if self._latent_tiles is None:
            return False
        tile_hw, _, tile_t, _ = self._latent_tiles
        _, _, frames, height, width = latent_shape
        return frames > tile_t or height > tile_hw or width > tile_hw

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
        video = video.to(self.vae.dtype)
        if self.needs_tiling(video.shape):
            decoded = decode_tiled(self.vae, video, timestep, self.tiling)
        else:
            decoded = self.vae.decode(video, timestep, return_dict=False)[0]
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
