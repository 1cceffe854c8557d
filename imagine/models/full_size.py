"""LTX-2 at its real size with random weights, built straight on a device: for performance runs (the GPU session,
`benchmarks/gpu_session.py`) where real weights cannot be downloaded. Output is noise; shapes, FLOPs, memory and
kernel choice are the real model's.

Sizes: diffusers' defaults for the LTX-2 classes are the released 19B model's (transformer 18.9 B parameters, video
VAE 1.2 B, text connectors 1.4 B, audio VAE and vocoder 0.05 B each); the text encoder is Gemma 3 12B
(`GEMMA3_12B_TEXT`, the width and depth the connectors' defaults expect: 3840 x 48 layers) with its SigLIP
so400m vision tower, which the prompt path never runs but which a real checkpoint holds in memory. The tokenizer is
the tiny preset's (a few hundred ids, all inside Gemma's vocabulary): tokenization costs nothing measurable.

How weights are made, without a float32 or CPU copy of a 19B model:
- diffusers modules are built on the `meta` device, cast, `to_empty` on the target device and filled there with
  fan-in scaled normal noise (`random_init_`); their only buffers are the VAEs' latent mean / std, set to 0 / 1
  (their constructor defaults). Any other buffer is refused loudly, since `to_empty` would leave it garbage.
- the text encoder goes through transformers' own `_from_config(dtype=...)` under the target device, so its
  computed buffers (RoPE frequencies, position ids) are right and its init is transformers'.
"""

from __future__ import annotations

import math
from typing import Any

import torch

GEMMA3_12B_TEXT: dict[str, Any] = {
    "hidden_size": 3840,
    "intermediate_size": 15360,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "max_position_embeddings": 131072,
}
SIGLIP_SO400M_VISION: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "vision_use_head": False,
}
# buffers a diffusers LTX-2 module may hold, and the value its constructor gives them
KNOWN_BUFFERS = {"latents_mean": 0.0, "latents_std": 1.0}


def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill `module`'s parameters in place, on their device: matrices ~ N(0, 1 / fan_in) (activations stay O(1)
    through 48 blocks), biases 0, other vectors (norm scales, embeddings of one dim) ~ N(0, 0.02)."""
    device = next(module.parameters()).device
    if device.type == "meta":  # shapes only (parameter counts, FLOP counting): nothing to fill
        return module
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.ndim >= 2:
                fan_in = math.prod(param.shape[1:])
                param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return module


def build_on_device(cls: type, config: dict[str, Any], device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """`cls(**config)` (a diffusers module) with random weights made on `device` in `dtype`: built on `meta`, so no
    weights are ever materialised anywhere else."""
    from diffusers.utils import logging as diffusers_logging

    with torch.device("meta"):
        module = cls(**config)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its "modules to keep in float32" note on `.to(dtype)`: none here
    try:
        module = module.to(dtype=dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    module = module.to_empty(device=torch.device(device))
    for name, buffer in module.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in KNOWN_BUFFERS:
            raise RuntimeError(
                f"{cls.__name__} has buffer {name!r}, which building on meta leaves uninitialised; teach "
                f"imagine.models.full_size its value"
            )
        buffer.fill_(KNOWN_BUFFERS[leaf])
    return random_init_(module, seed).requires_grad_(False).eval()


def transformer_config(layers: int | None = None) -> dict[str, Any]:
    """The full LTX-2 transformer config (diffusers' defaults), optionally with fewer blocks (`layers`)."""
    from diffusers import LTX2VideoTransformer3DModel

    with torch.device("meta"):
        defaults = LTX2VideoTransformer3DModel().config
    config = {key: value for key, value in defaults.items() if not key.startswith("_")}
    if layers is not None:
        config["num_layers"] = layers
    return config


def build_text_encoder(device: str | torch.device, dtype: torch.dtype, layers: int | None = None):
    """Gemma 3 12B (random, transformers' init) made on `device`; `layers` < 48 keeps the width but fewer blocks
    (the connectors then need `text_proj_in_factor = layers + 1`)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from imagine.models.tiny import _tiny_vocab

    vocab = _tiny_vocab()
    text = {**GEMMA3_12B_TEXT, "vocab_size": 262208, "pad_token_id": vocab["<pad>"], "eos_token_id": vocab["<eos>"],
            "bos_token_id": vocab["<bos>"]}
    if layers is not None:
        text["num_hidden_layers"] = layers
    config = Gemma3Config(text_config=text, vision_config=SIGLIP_SO400M_VISION, image_token_index=vocab["<mask>"],
                          boi_token_index=vocab["<bos>"], eoi_token_index=vocab["<eos>"])
    with torch.device(device):
        model = Gemma3ForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


def build_full_ltx2(
    device: str | torch.device,
    dtype: torch.dtype = torch.bfloat16,
    *,
    names: tuple[str, ...] = ("tokenizer", "text_encoder", "connectors", "transformer", "vae", "audio_vae", "vocoder",
                              "scheduler"),
    transformer: torch.nn.Module | None = None,
    transformer_layers: int | None = None,
    text_layers: int | None = None,
) -> dict[str, Any]:
    """The LTX-2 pipeline components named in `names` at full size, random, on `device`: the same dict
    `imagine.models.loading.load_components` returns, so the project's stage classes run on it unchanged.
    `transformer` reuses an already-built one (it is 38 GB in bf16)."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import GemmaTokenizer

    from imagine.models.tiny import _tiny_vocab

    builders = {
        "transformer": lambda: transformer
        if transformer is not None
        else build_on_device(LTX2VideoTransformer3DModel, transformer_config(transformer_layers), device, dtype),
        "connectors": lambda: build_on_device(
            LTX2TextConnectors,
            {} if text_layers is None else {"text_proj_in_factor": text_layers + 1},
            device,
            dtype,
        ),
        "text_encoder": lambda: build_text_encoder(device, dtype, text_layers),
        "vae": lambda: build_on_device(AutoencoderKLLTX2Video, {}, device, dtype),
        "audio_vae": lambda: build_on_device(AutoencoderKLLTX2Audio, {}, device, dtype),
        "vocoder": lambda: build_on_device(LTX2Vocoder, {}, device, dtype),
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }

    def tokenizer():
        tok = GemmaTokenizer(vocab=_tiny_vocab(), merges=[])
        tok.padding_side = "left"
        return tok

    builders["tokenizer"] = tokenizer
    unknown = sorted(set(names) - set(builders))
    if unknown:
        raise ValueError(f"names: unknown LTX-2 components {unknown}; known: {sorted(builders)}")
    return {name: builders[name]() for name in names}


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
