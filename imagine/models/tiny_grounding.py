"""Random-init, seeded "tiny" grounding models built in code: a GroundingDINO text-conditioned detector (with a
tiny BERT WordPiece tokenizer) and a SAM2 video segmenter, saved with `save_pretrained` in the grounding layout

    <dir>/model_index.json            each component's library and class (diffusers' format)
    <dir>/detector/                   GroundingDinoForObjectDetection
    <dir>/detector_tokenizer/         its tokenizer
    <dir>/detector_image_processor/   its image processor (the PIL backend: the default one needs torchvision)
    <dir>/sam2/                       Sam2VideoModel

and loaded back by `imagine.models.loading.load_components`, the same `from_pretrained` path as real checkpoints
(GroundingDINO + SAM2.1 saved into the same subfolders with such an index). This is the builtin source of the
`tiny-grounding` preset. Their detections and masks are noise; they exist so the edit path runs (and is tested) on
a laptop CPU in seconds.

Config constraints found while shrinking them (transformers 5.x): GroundingDINO needs `d_model` divisible by 32
(GroupNorm(32)), `decoder_layers >= 2` and a Swin backbone with `use_timm_backbone=False`; SAM2 video needs
`memory_encoder_output_channels == 64`, `fpn_hidden_size` a multiple of 64 (object pointers are split into
64-wide memory tokens) equal to `memory_encoder_hidden_size`, and no Hiera global-attention block may be the first
block of a query-pooling stage.
"""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import torch

from imagine.models.cache import MODEL_INDEX, build_dir_once

TINY_GROUNDING_SEED = 0
# Bump when the build recipe changes in a way the config dicts below do not capture.
TINY_GROUNDING_RECIPE_VERSION = 3
GROUNDING_INDEX_CLASS = "ImagineGrounding"
# The components of a grounding model directory, each in the subfolder of its name (see the module docstring).
GROUNDING_COMPONENTS = ["detector", "detector_tokenizer", "detector_image_processor", "sam2"]

SWIN_CONFIG: dict[str, Any] = {
    "image_size": 64,
    "patch_size": 4,
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "window_size": 4,
    "out_features": ["stage2", "stage3", "stage4"],
}
BERT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,  # >= the detector's max_text_len
}
DETECTOR_CONFIG: dict[str, Any] = {
    "use_timm_backbone": False,
    "num_queries": 20,
    "encoder_layers": 1,
    "encoder_ffn_dim": 32,
    "encoder_attention_heads": 2,
    "decoder_layers": 2,  # GroundingDINO needs >= 2
    "decoder_ffn_dim": 32,
    "decoder_attention_heads": 2,
    "d_model": 32,  # GroupNorm(32, d_model)
    "num_feature_levels": 4,
    "encoder_n_points": 2,
    "decoder_n_points": 2,
    "max_text_len": 64,  # the char-level tiny vocabulary spends one token per character
}
# The real checkpoints resize the short side to 800 (long side <= 1333); the tiny one to 128.
DETECTOR_IMAGE_SIZE: dict[str, int] = {"shortest_edge": 128, "longest_edge": 256}

TINY_SAM2_OBJECT_SCORE_BIAS = 10.0
SAM2_IMAGE_SIZE = 128  # real SAM2: 1024; masks come out at image_size / 4
_SAM2_HIDDEN = 128  # a multiple of 64 (memory_encoder_output_channels), == memory_encoder_hidden_size
SAM2_VISION_CONFIG: dict[str, Any] = {
    "backbone_config": {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 12,
        "num_attention_heads": 1,
        "image_size": [SAM2_IMAGE_SIZE, SAM2_IMAGE_SIZE],
        "blocks_per_stage": [1, 1, 2, 1],
        "embed_dim_per_stage": [12, 24, 48, 96],
        "num_attention_heads_per_stage": [1, 1, 2, 2],
        "window_size_per_stage": [8, 4, 4, 2],
        "global_attention_blocks": [3],  # the 2nd block of stage 3, not a stage's first (query-pooling) block
        "window_positional_embedding_background_size": [4, 4],
    },
    "backbone_channel_list": [96, 48, 24, 12],
    "backbone_feature_sizes": [[SAM2_IMAGE_SIZE // s] * 2 for s in (4, 8, 16)],
    "fpn_hidden_size": _SAM2_HIDDEN,
    "model_type": "sam2_vision_model",
}
SAM2_CONFIG: dict[str, Any] = {
    "image_size": SAM2_IMAGE_SIZE,
    "num_maskmem": 3,
    "memory_attention_hidden_size": _SAM2_HIDDEN,
    "memory_attention_num_layers": 1,
    "memory_attention_feed_forward_hidden_size": 64,
    "memory_attention_rope_feat_sizes": [SAM2_IMAGE_SIZE // 16] * 2,
    "memory_encoder_hidden_size": _SAM2_HIDDEN,
    "memory_encoder_output_channels": 64,
    "mask_downsampler_embed_dim": _SAM2_HIDDEN,
    "memory_fuser_embed_dim": _SAM2_HIDDEN,
    "memory_fuser_intermediate_dim": 64,
    "memory_fuser_num_layers": 1,
    "max_object_pointers_in_encoder": 4,
}
SAM2_PROMPT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": _SAM2_HIDDEN,
    "image_size": SAM2_IMAGE_SIZE,
    "patch_size": 16,
    "mask_input_channels": 8,
}
SAM2_MASK_DECODER_CONFIG: dict[str, Any] = {
    "hidden_size": _SAM2_HIDDEN,
    "mlp_dim": 64,
    "num_attention_heads": 2,
    "iou_head_hidden_dim": 16,
}


def tiny_grounding_vocab() -> dict[str, int]:
    """A character-level WordPiece vocabulary: enough for any lowercase English phrase, no download."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    starts = list(string.ascii_lowercase + string.digits + string.punctuation)
    continuations = [f"##{c}" for c in string.ascii_lowercase + string.digits]
    return {token: i for i, token in enumerate(specials + starts + continuations)}


def tiny_grounding_config() -> dict[str, Any]:
    """Everything that determines the tiny grounding models' weights and files (hashed into the directory name)."""
    return {
        "recipe_version": TINY_GROUNDING_RECIPE_VERSION,
        "seed": TINY_GROUNDING_SEED,
        "sam2_object_score_bias": TINY_SAM2_OBJECT_SCORE_BIAS,
        "swin": SWIN_CONFIG,
        "bert": BERT_CONFIG,
        "detector": DETECTOR_CONFIG,
        "detector_image_size": DETECTOR_IMAGE_SIZE,
        "vocab": tiny_grounding_vocab(),
        "sam2_vision": SAM2_VISION_CONFIG,
        "sam2": SAM2_CONFIG,
        "sam2_prompt_encoder": SAM2_PROMPT_ENCODER_CONFIG,
        "sam2_mask_decoder": SAM2_MASK_DECODER_CONFIG,
        "torch": torch.__version__.split("+")[0],
    }


def tiny_grounding_config_hash() -> str:
    """Short, stable hash of `tiny_grounding_config()`."""
    blob = json.dumps(tiny_grounding_config(), sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_tiny_grounding_components() -> dict[str, Any]:
    """Construct the tiny detector (+ tokenizer, image processor) and SAM2 video model in memory, seeded."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        Sam2VideoConfig,
        Sam2VideoModel,
        SwinConfig,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    vocab = tiny_grounding_vocab()
    tokenizer = BertTokenizer(vocab=vocab, model_max_length=DETECTOR_CONFIG["max_text_len"])
    detector_config = GroundingDinoConfig(
        backbone_config=SwinConfig(**SWIN_CONFIG),
        text_config=BertConfig(vocab_size=len(vocab), pad_token_id=vocab["[PAD]"], **BERT_CONFIG),
        **DETECTOR_CONFIG,
    )
    torch.manual_seed(TINY_GROUNDING_SEED)
    detector = GroundingDinoForObjectDetection(detector_config).eval()

    sam2_config = Sam2VideoConfig(
        vision_config=SAM2_VISION_CONFIG,
        prompt_encoder_config=SAM2_PROMPT_ENCODER_CONFIG,
        mask_decoder_config=SAM2_MASK_DECODER_CONFIG,
        **SAM2_CONFIG,
    )
    torch.manual_seed(TINY_GROUNDING_SEED)
    sam2 = Sam2VideoModel(sam2_config).eval()
    with torch.no_grad():
        # SAM2 blanks a frame's mask when its object score says "not visible"; random weights say so about half
        # the time, which would leave the tiny model's masks empty. A large bias makes the prompted object always
        # visible, so the (random) mask logits reach the output and the mask path is exercised end to end.
        sam2.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(TINY_SAM2_OBJECT_SCORE_BIAS)
    return {
        "detector": detector,
        "detector_tokenizer": tokenizer,
        "detector_image_processor": GroundingDinoImageProcessorPil(size=DETECTOR_IMAGE_SIZE),
        "sam2": sam2,
    }


def save_tiny_grounding(target_dir: Path) -> Path:
    """Build the tiny grounding models and `save_pretrained` them under `target_dir` (no locking; see
    `build_tiny_grounding`)."""
    target_dir = Path(target_dir)
    components = build_tiny_grounding_components()
    index: dict[str, Any] = {"_class_name": GROUNDING_INDEX_CLASS}
    for name in GROUNDING_COMPONENTS:
        components[name].save_pretrained(target_dir / name)
        index[name] = ["transformers", type(components[name]).__name__]
    (target_dir / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return target_dir


def tiny_grounding_dir(home: Path) -> Path:
    """Where the tiny grounding models live under an Imagine home directory."""
    return Path(home) / "models" / f"tiny-grounding-{tiny_grounding_config_hash()}"


def build_tiny_grounding(target_dir: Path) -> Path:
    """Build the tiny grounding models into `target_dir` unless already there; return `target_dir`.
    Safe with concurrent builders in any processes (see `imagine.models.cache.build_dir_once`)."""
    return build_dir_once(Path(target_dir), save_tiny_grounding)


def ensure_tiny_grounding(home: Path) -> Path:
    """Return `home/models/tiny-grounding-<config-hash>`, building it there once if missing."""
    return build_tiny_grounding(tiny_grounding_dir(Path(home).expanduser()))
