"""Tiled video decode (`imagine.pipeline.decode`): tiles line up with the whole-clip decode, cross-fade to it, and
bound the decoder's activations by one tile's.

Tolerance: a decode tile only sees its own latents, so tiled equals whole exactly only for a decoder whose receptive
field fits in the overlap. That holds for the local test decoder below (checked to 1e-5). It does not for the tiny
random-init VAE: a latent column still moves outputs 6 latent pixels (192 px) away by 2e-2, and one latent frame moves
every frame of a 33-frame clip by >= 0.2, on outputs in [-2, 2]. There the stated tolerance is a mean absolute error
below 0.1 (measured 0.07) with 128 px / 32 frame overlaps, shrinking as the overlap grows, and frames that line up
with the whole decode (4x lower error than against the whole decode shifted by one frame).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

from imagine.pipeline.decode import DecoderStage, TilingConfig, _blend_weights, _tile_spans, decode_tiled
from imagine.pipeline.types import Latents


class LocalDecoder:
    """A decoder with LTX-2's frame arithmetic and no spatial or temporal context: latent frame 0 -> 1 frame, each
    later latent frame -> `temporal` frames, each latent pixel -> `spatial` x `spatial` pixels, channels mixed by a
    fixed matrix. Tiling must reproduce its whole-clip output exactly."""

    def __init__(self, spatial: int = 4, temporal: int = 8, channels: int = 4):
        self.spatial_compression_ratio = spatial
        self.temporal_compression_ratio = temporal
        self.mix = torch.randn(3, channels, generator=torch.Generator().manual_seed(0))

    def decode(self, z: torch.Tensor, temb: Any = None, return_dict: bool = False) -> tuple[torch.Tensor]:
        video = torch.einsum("oc,bcfhw->bofhw", self.mix, z)
        video = video.repeat_interleave(self.temporal_compression_ratio, dim=2)[
            :, :, self.temporal_compression_ratio - 1 :
        ]
        video = video.repeat_interleave(self.spatial_compression_ratio, dim=3)
        return (video.repeat_interleave(self.spatial_compression_ratio, dim=4),)


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    from imagine.models.tiny import build_tiny_components

    return build_tiny_components()


def largest_decoder_activation(vae, fn) -> tuple[torch.Tensor, int]:
    """`fn()`'s result and the element count of the largest tensor any module inside `vae.decoder` produced."""
    largest = 0

    def record(module, inputs, output) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel())

    handles = [module.register_forward_hook(record) for module in vae.decoder.modules()]
    try:
        result = fn()
    finally:
        for handle in handles:
            handle.remove()
    return result, largest


def latents_for(shape: tuple[int, int, int, int, int], vae, audio_vae) -> Latents:
    _, _, frames, height, width = shape
    generator = torch.Generator().manual_seed(0)
    return Latents(
        video=torch.randn(shape, generator=generator),
        audio=torch.randn(1, audio_vae.config.latent_channels, 8, 4, generator=generator),
        width=width * vae.spatial_compression_ratio,
        height=height * vae.spatial_compression_ratio,
        num_frames=(frames - 1) * vae.temporal_compression_ratio + 1,
        fps=24.0,
    )


# --- tile arithmetic -------------------------------------------------------------------------------------------


def test_tile_spans_overlap_and_cover():
    assert _tile_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert _tile_spans(9, 4, 1) == [(0, 4), (3, 7), (6, 9)]
    assert _tile_spans(3, 4, 2) == [(0, 3)]
    assert _tile_spans(4, 4, 0) == [(0, 4)]


def test_blend_weights_cross_fade_and_sum_to_one():
    spans = [(0, 6), (4, 10)]
    first, second = _blend_weights(spans, 10)
    assert torch.equal(first[:4], torch.ones(4)) and torch.equal(second[2:], torch.ones(4))
    assert torch.allclose(first[4:] + second[:2], torch.ones(2))
    assert first[4] > first[5] > 0 and 0 < second[0] < second[1]


def test_tiled_decode_is_exact_for_a_local_decoder():
    decoder = LocalDecoder()
    z = torch.randn(1, 4, 11, 9, 13, generator=torch.Generator().manual_seed(1))
    whole = decoder.decode(z)[0]
    # several tiles in every dimension, last tiles shorter; temporal overlap of 1 and 2 latent frames
    for overlap_frames in (8, 16):
        tiling = TilingConfig(tile_size_px=16, tile_overlap_px=8, tile_frames=32, tile_overlap_frames=overlap_frames)
        tiled = decode_tiled(decoder, z, None, tiling)
        assert tiled.shape == whole.shape == (1, 3, 81, 36, 52)
        assert (tiled - whole).abs().max() < 1e-5


# --- the tiny LTX-2 VAE ----------------------------------------------------------------------------------------


def test_tiled_decode_of_the_tiny_vae_is_close_to_whole_and_aligned(components):
    vae = components["vae"]
    z = torch.randn(1, 4, 9, 8, 8, generator=torch.Generator().manual_seed(0))  # 65 frames of 256 x 256
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
    # 192 px / 48 frame tiles: 2 x 2 spatial and 3 temporal tiles; 128 px / 32 frame overlaps
    wide = TilingConfig(tile_size_px=192, tile_overlap_px=128, tile_frames=48, tile_overlap_frames=32)
    narrow = TilingConfig(tile_size_px=192, tile_overlap_px=64, tile_frames=48, tile_overlap_frames=16)
    tiled = decode_tiled(vae, z, None, wide)
    assert tiled.shape == whole.shape and tiled.dtype == whole.dtype

    error = (tiled - whole).abs().mean()
    assert error < 0.1 and error < 0.35 * whole.abs().mean()
    shifted_error = (tiled[:, :, 1:] - whole[:, :, :-1]).abs().mean()
    assert error < shifted_error / 2  # frames line up with the whole decode
    assert (decode_tiled(vae, z, None, narrow) - whole).abs().mean() > error  # same tiles, less overlap: more error


def test_tiling_bounds_the_largest_decoder_activation(components):
    vae = components["vae"]
    z = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # 33 frames of 128 x 128
    tiling = TilingConfig(tile_size_px=64, tile_overlap_px=32, tile_frames=16, tile_overlap_frames=8)
    with torch.no_grad():
        _, whole_largest = largest_decoder_activation(vae, lambda: vae.decode(z, return_dict=False)[0])
    _, tiled_largest = largest_decoder_activation(vae, lambda: decode_tiled(vae, z, None, tiling))
    # a tile is 2 of 5 latent frames (9 of 33 frames) and 2 x 2 of 4 x 4 latent pixels (64 x 64 of 128 x 128)
    assert tiled_largest <= whole_largest * (9 / 33) * (64 / 128) ** 2 * 1.01
    assert tiled_largest < whole_largest / 10


# --- DecoderStage ----------------------------------------------------------------------------------------------


def test_decoder_stage_tiles_only_above_one_tile(components):
    vae, audio_vae = components["vae"], components["audio_vae"]
    default = DecoderStage(components)
    assert default.tiling == TilingConfig()
    assert not default.needs_tiling((1, 4, 8, 16, 16))  # 57 frames of 512 x 512: one tile
    assert default.needs_tiling((1, 4, 9, 16, 16))  # 65 frames
    assert default.needs_tiling((1, 4, 8, 16, 17))  # 544 px wide
    assert not DecoderStage(components, tiling=False).needs_tiling((1, 4, 100, 100, 100))

    small = latents_for((1, 4, 3, 2, 4), vae, audio_vae)  # below the default tile: the untiled path, bit for bit
    assert torch.equal(default.decode_video(small), DecoderStage(components, tiling=False).decode_video(small))

    tiling = TilingConfig(tile_size_px=64, tile_overlap_px=32, tile_frames=16, tile_overlap_frames=8)
    large = latents_for((1, 4, 4, 3, 3), vae, audio_vae)  # 3 temporal x 2 x 2 spatial tiles
    tiled_stage = DecoderStage(components, tiling=tiling)
    assert tiled_stage.needs_tiling(large.video.shape)
    media = tiled_stage(large)
    assert media.frames.shape == (large.num_frames, large.height, large.width, 3)
    assert media.frames.std() > 10  # real content, not a blank buffer


def test_tiling_config_errors_name_the_field(components):
    with pytest.raises(ValidationError, match="tile_overlap_px"):
        TilingConfig(tile_size_px=256, tile_overlap_px=256)
    with pytest.raises(ValidationError, match="tile_overlap_frames"):
        TilingConfig(tile_frames=16, tile_overlap_frames=16)
    with pytest.raises(ValidationError, match="extra"):
        TilingConfig(tile_px=64)
    with pytest.raises(ValueError, match="tiling.tile_size_px must be a multiple of 32"):
        DecoderStage(components, tiling=TilingConfig(tile_size_px=100))
    with pytest.raises(ValueError, match="tiling.tile_overlap_frames must be a multiple of 8"):
        DecoderStage(components, tiling=TilingConfig(tile_overlap_frames=12))
    with pytest.raises(TypeError, match="tiling"):
        DecoderStage(components, tiling="yes")
