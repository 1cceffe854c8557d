"""Random-init, seeded "tiny-vace" Wan VACE model built in code, saved in diffusers' `WanVACEPipeline` layout.

The edit path's test and demo model, the way `imagine.models.tiny` is for LTX-2. It keeps the real Wan 2.1 shapes
that the rest of the system depends on -- VAE 8x spatial / 4x temporal compression, 16 latent channels, transformer
patch (1, 2, 2), VACE control input of 2 x 16 latents + 8 x 8 mask channels, the same UniPC flow scheduler config as
the released checkpoints -- and shrinks widths and depths, so masked repainting runs on a laptop CPU in seconds.
Its output is noise. It is loaded by the same `from_pretrained` path as real weights.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import torch

from imagine.models.cache import build_dir_once

TINY_VACE_SEED = 0
# Bump when the build recipe changes in a way the config dicts below do not capture.
TINY_VACE_RECIPE_VERSION = 1

# Wan's VAE: len(temperal_downsample) 2x stages in space (8x), sum(temperal_downsample) in time (4x).
VAE_CONFIG: dict[str, Any] = {
    "base_dim": 3,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    # No extra residual blocks: the full-resolution causal conv3d layers dominate CPU time (4x faster encode).
    "num_res_blocks": 0,
    "temperal_downsample": [False, True, True],
}
TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "in_channels": VAE_CONFIG["z_dim"],
    "out_channels": VAE_CONFIG["z_dim"],
    "text_dim": TEXT_ENCODER_CONFIG["d_model"],
    "freq_dim": 256,
    "ffn_dim": 32,
    # Self-attention over the video tokens is most of the time (480p: 21060 tokens), so few blocks.
    "num_layers": 2,
    "qk_norm": "rms_norm_across_heads",
    # RoPE table length must cover the longest latent axis / patch (480p: 108 / 2); real Wan uses 1024 too.
    "rope_max_seq_len": 1024,
    "vace_layers": [0],
    # inactive + reactive video latents (2 x z_dim) + the 8 x 8 space-to-depth mask
    "vace_in_channels": 2 * VAE_CONFIG["z_dim"] + 8 * 8,
}
# As in the released Wan2.1-VACE diffusers checkpoints (flow-matching UniPC, shift 3).
SCHEDULER_CONFIG: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "flow_shift": 3.0,
}


def tiny_vace_config() -> dict[str, Any]:
    """Everything that determines the tiny VACE model's weights (hashed into its directory name)."""
    return {
        "recipe_version": TINY_VACE_RECIPE_VERSION,
        "seed": TINY_VACE_SEED,
        "vae": VAE_CONFIG,
        "text_encoder": TEXT_ENCODER_CONFIG,
        "transformer": TRANSFORMER_CONFIG,
        "scheduler": SCHEDULER_CONFIG,
        "vocab": _tiny_vocab(),
        "torch": torch.__version__.split("+")[0],
    }


def tiny_vace_config_hash() -> str:
    """Short, stable hash of `tiny_vace_config()`."""
    blob = json.dumps(tiny_vace_config(), sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _tiny_vocab() -> list[tuple[str, float]]:
    """A unigram vocabulary that fits the tiny UMT5 (T5 ids: pad 0, eos 1, unk 2); scores favour whole letters."""
    specials = ["<pad>", "</s>", "<unk>"]
    pieces = ["▁"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    vocab = [(tok, 0.0) for tok in specials] + [(piece, -1.0) for piece in pieces]
    if len(vocab) > TEXT_ENCODER_CONFIG["vocab_size"]:
        raise RuntimeError(f"tiny vocab has {len(vocab)} tokens, more than the text encoder's embedding table")
    return vocab


def build_tiny_vace_components() -> dict[str, Any]:
    """Construct the tiny Wan VACE components in memory, seeded so every build has identical weights."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACETransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    tokenizer = T5Tokenizer(vocab=_tiny_vocab(), extra_ids=0)
    torch.manual_seed(TINY_VACE_SEED)
    text_encoder = UMT5EncoderModel(UMT5Config(**TEXT_ENCODER_CONFIG))
    torch.manual_seed(TINY_VACE_SEED)
    vae = AutoencoderKLWan(**VAE_CONFIG)
    torch.manual_seed(TINY_VACE_SEED)
    transformer = WanVACETransformer3DModel(**TRANSFORMER_CONFIG)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "scheduler": UniPCMultistepScheduler(**SCHEDULER_CONFIG),
        "transformer": transformer,
    }


def save_tiny_vace(target_dir: Path) -> Path:
    """Build the tiny VACE model and `save_pretrained` it to `target_dir` (no locking; see `build_tiny_vace`)."""
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline(**build_tiny_vace_components())
    pipe.save_pretrained(str(target_dir))
    return Path(target_dir)


def tiny_vace_model_dir(home: Path) -> Path:
    """Where the tiny VACE model lives under an Imagine home directory."""
    return Path(home) / "models" / f"tiny-vace-{tiny_vace_config_hash()}"


def ensure_tiny_vace(home: Path) -> Path:
    """Return `home/models/tiny-vace-<config-hash>`, building it there once if missing."""
    return build_tiny_vace(tiny_vace_model_dir(home))


def build_tiny_vace(target_dir: Path) -> Path:
    """Build the tiny VACE model into `target_dir` unless it is already there; return `target_dir`.
    Safe with concurrent builders in any processes (see `imagine.models.cache.build_dir_once`)."""
    return build_dir_once(Path(target_dir), save_tiny_vace)
