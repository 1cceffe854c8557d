"""What the generic layers need to know about LTX-2 (`LTX2VideoTransformer3DModel`), kept with the model: its size
for the router's cost model (here, pure Python) and its parallel plans (`imagine.models.ltx2.parallel`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagine.parallel.routing import TransformerDims


def ltx2_transformer_dims(config: Mapping[str, Any], vae_spatial: int = 32, vae_temporal: int = 8) -> TransformerDims:
    """Dims of an `LTX2VideoTransformer3DModel` config (its `config.json`; missing keys take diffusers' defaults,
    the full-size model); params are counted analytically from the linear layers (what dominates), so no model has
    to be built."""
    heads, head_dim = config.get("num_attention_heads", 32), config.get("attention_head_dim", 128)
    a_heads, a_head_dim = config.get("audio_num_attention_heads", 32), config.get("audio_attention_head_dim", 64)
    layers = config.get("num_layers", 48)
    hidden, audio_hidden = heads * head_dim, a_heads * a_head_dim
    ffn_mult = 4.0
    # per block: video self-attn (4 h^2), text cross-attn (2 h^2 + 2 h*cross), FFN (2 * mult * h^2);
    # audio likewise at its width; audio<->video cross-attention (about 2 * (h*a + a*h) + 2 a^2)
    cross = config.get("cross_attention_dim", hidden)
    a_cross = config.get("audio_cross_attention_dim", audio_hidden)
    video = 4 * hidden**2 + 2 * hidden**2 + 2 * hidden * cross + 2 * ffn_mult * hidden**2
    audio = 4 * audio_hidden**2 + 2 * audio_hidden**2 + 2 * audio_hidden * a_cross + 2 * ffn_mult * audio_hidden**2
    av = 4 * hidden * audio_hidden + 4 * audio_hidden**2
    patch = config.get("patch_size", 1)
    sample_rate, hop = config.get("audio_sampling_rate", 16000), config.get("audio_hop_length", 160)
    return TransformerDims(
        num_layers=layers,
        hidden=hidden,
        audio_hidden=audio_hidden,
        ffn_mult=ffn_mult,
        params=int(layers * (video + audio + av)),
        spatial_ratio=vae_spatial * patch,
        temporal_ratio=vae_temporal,
        audio_tokens_per_s=sample_rate / hop / config.get("audio_scale_factor", 4),
    )


__all__ = ["ltx2_transformer_dims"]
