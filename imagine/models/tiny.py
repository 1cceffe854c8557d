"""Random-init, seeded "tiny" LTX-2 family model built in code, saved in diffusers' `LTX2Pipeline` layout.

The tiny model keeps LTX-2's real shapes where they matter to the rest of the system (video VAE 32x spatial /
8x temporal compression, audio VAE 4x mel / 4x time compression, vocoder upsampling == mel hop length) and
shrinks everything else, so the whole service (sizing, stages, muxing, serving) runs on a laptop CPU in seconds.
It is loaded by exactly the same `from_pretrained` path as real weights.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import torch

from imagine.models.cache import build_dir_once

TINY_SEED = 0
# Bump when the build recipe changes in a way the config dicts below do not capture.
TINY_RECIPE_VERSION = 1

GEMMA_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,  # == connectors' heads x head_dim (4 x 8)
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "sliding_window": 64,
}
GEMMA_VISION_CONFIG: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
}
CONNECTORS_CONFIG: dict[str, Any] = {
    "caption_channels": GEMMA_TEXT_CONFIG["hidden_size"],
    "text_proj_in_factor": GEMMA_TEXT_CONFIG["num_hidden_layers"] + 1,
    "video_connector_num_attention_heads": 4,
    "video_connector_attention_head_dim": 8,
    "video_connector_num_layers": 1,
    "video_connector_num_learnable_registers": None,
    "audio_connector_num_attention_heads": 4,
    "audio_connector_attention_head_dim": 8,
    "audio_connector_num_layers": 1,
    "audio_connector_num_learnable_registers": None,
    "connector_rope_base_seq_len": 32,
    "rope_theta": 10000.0,
    "rope_double_precision": False,
    "causal_temporal_positioning": False,
    "rope_type": "split",
}
# Real LTX-2 structure (patch 4 x three 2x spatio-temporal stages = 32x space, 8x time), tiny widths/depths.
VIDEO_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (8, 8, 8),
    "down_block_types": ("LTX2VideoDownBlock3D",) * 3,
    "decoder_block_out_channels": (8, 16, 32),  # each up block halves channels
    "layers_per_block": (1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1),
    "spatio_temporal_scaling": (True, True, True),
    "decoder_spatio_temporal_scaling": (True, True, True),
    "decoder_inject_noise": (False, False, False, False),
    "downsample_type": ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    "upsample_type": ("spatiotemporal", "spatiotemporal", "spatiotemporal"),
    "upsample_residual": (True, True, True),
    "upsample_factor": (2, 2, 2),
    "timestep_conditioning": False,
    "patch_size": 4,
    "patch_size_t": 1,
    "encoder_causal": True,
    "decoder_causal": False,
}
AUDIO_VAE_CONFIG: dict[str, Any] = {
    "base_channels": 8,  # == latent_channels * latent mel bins (the latents_mean/std size), as in LTX-2
    "output_channels": 2,
    "ch_mult": (1, 2, 4),  # real LTX-2 multipliers: 4x mel and 4x time compression
    "num_res_blocks": 1,
    "attn_resolutions": None,
    "in_channels": 2,
    "resolution": 16,
    "latent_channels": 2,
    "norm_type": "pixel",
    "causality_axis": "height",
    "dropout": 0.0,
    "mid_block_add_attention": False,
    "sample_rate": 16000,
    "mel_hop_length": 160,
    "is_causal": True,
    "mel_bins": 16,
}
VOCODER_CONFIG: dict[str, Any] = {
    "in_channels": AUDIO_VAE_CONFIG["output_channels"] * AUDIO_VAE_CONFIG["mel_bins"],
    "hidden_channels": 16,
    "out_channels": 2,
    "upsample_kernel_sizes": [8, 8, 20],
    "upsample_factors": [4, 4, 10],  # product == mel_hop_length (160) at output 16 kHz
    "resnet_kernel_sizes": [3],
    "resnet_dilations": [[1, 3, 5]],
    "leaky_relu_negative_slope": 0.1,
    "output_sampling_rate": 16000,
}
_AUDIO_LATENT_MEL_BINS = AUDIO_VAE_CONFIG["mel_bins"] // 4
TRANSFORMER_CONFIG: dict[str, Any] = {
    "in_channels": VIDEO_VAE_CONFIG["latent_channels"],
    "out_channels": VIDEO_VAE_CONFIG["latent_channels"],
    "patch_size": 1,
    "patch_size_t": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 16,
    "audio_in_channels": AUDIO_VAE_CONFIG["latent_channels"] * _AUDIO_LATENT_MEL_BINS,
    "audio_out_channels": AUDIO_VAE_CONFIG["latent_channels"] * _AUDIO_LATENT_MEL_BINS,
    "audio_num_attention_heads": 2,
    "audio_attention_head_dim": 4,
    "audio_cross_attention_dim": 8,
    "num_layers": 2,
    "qk_norm": "rms_norm_across_heads",
    "caption_channels": GEMMA_TEXT_CONFIG["hidden_size"],
    "rope_double_precision": False,
    "rope_type": "split",
}


def tiny_config() -> dict[str, Any]:
    """Everything that determines the tiny model's weights (hashed into its directory name)."""
    return {
        "recipe_version": TINY_RECIPE_VERSION,
        "seed": TINY_SEED,
        "gemma_text": GEMMA_TEXT_CONFIG,
        "gemma_vision": GEMMA_VISION_CONFIG,
        "connectors": CONNECTORS_CONFIG,
        "transformer": TRANSFORMER_CONFIG,
        "vae": VIDEO_VAE_CONFIG,
        "audio_vae": AUDIO_VAE_CONFIG,
        "vocoder": VOCODER_CONFIG,
        "torch": torch.__version__.split("+")[0],
    }


def tiny_config_hash() -> str:
    """Short, stable hash of `tiny_config()`."""
    blob = json.dumps(tiny_config(), sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _tiny_vocab() -> dict[str, int]:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = ["▁"] + list(string.ascii_letters + string.digits + string.punctuation)
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    return {tok: i for i, tok in enumerate(specials + chars + byte_tokens)}


def build_tiny_components() -> dict[str, Any]:
    """Construct the tiny LTX-2 components in memory, seeded so every build has identical weights."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        GemmaTokenizer,
    )

    vocab = _tiny_vocab()
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[])
    tokenizer.padding_side = "left"

    torch.manual_seed(TINY_SEED)
    text_config = {**GEMMA_TEXT_CONFIG, "vocab_size": len(vocab), "pad_token_id": 0, "eos_token_id": 1,
                   "bos_token_id": 2}
    gemma_config = Gemma3Config(
        text_config=text_config,
        vision_config=GEMMA_VISION_CONFIG,
        mm_tokens_per_image=4,
        image_token_index=vocab["<mask>"],
        boi_token_index=vocab["<bos>"],
        eoi_token_index=vocab["<eos>"],
    )
    text_encoder = Gemma3ForConditionalGeneration(gemma_config)

    torch.manual_seed(TINY_SEED)
    connectors = LTX2TextConnectors(**CONNECTORS_CONFIG)
    torch.manual_seed(TINY_SEED)
    transformer = LTX2VideoTransformer3DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(TINY_SEED)
    vae = AutoencoderKLLTX2Video(**VIDEO_VAE_CONFIG)
    torch.manual_seed(TINY_SEED)
    audio_vae = AutoencoderKLLTX2Audio(**AUDIO_VAE_CONFIG)
    torch.manual_seed(TINY_SEED)
    vocoder = LTX2Vocoder(**VOCODER_CONFIG)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae,
        "audio_vae": audio_vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "connectors": connectors,
        "transformer": transformer,
        "vocoder": vocoder,
    }


def save_tiny_ltx2(target_dir: Path) -> Path:
    """Build the tiny model and `save_pretrained` it to `target_dir` (no locking; see `build_tiny_ltx2`)."""
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline(**build_tiny_components())
    pipe.save_pretrained(str(target_dir))
    return Path(target_dir)


def tiny_model_dir(home: Path) -> Path:
    """Where the tiny model lives under an Imagine home directory."""
    return Path(home) / "models" / f"tiny-{tiny_config_hash()}"


def ensure_tiny_ltx2(home: Path) -> Path:
    """Return `home/models/tiny-<config-hash>`, building it there once if missing."""
    return build_tiny_ltx2(tiny_model_dir(home))


def build_tiny_ltx2(target_dir: Path) -> Path:
    """Build the tiny model into `target_dir` unless it is already there; return `target_dir`.
    Safe with concurrent builders in any processes (see `imagine.models.cache.build_dir_once`)."""
    return build_dir_once(Path(target_dir), save_tiny_ltx2)
