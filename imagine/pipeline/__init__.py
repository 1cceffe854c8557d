"""LTX-2 generation as plain, Ray-free stages: encode -> denoise (resumable) -> decode -> mux.

`sizing` maps user-facing sizes to model-legal ones; `types` holds the picklable values passed between stages.
"""

from imagine.pipeline.decode import DecoderStage
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.generate import LocalGenerator
from imagine.pipeline.mux import MuxInfo, mux_mp4, probe_mp4
from imagine.pipeline.types import (
    DecodedMedia,
    DenoiseState,
    GenerationSpec,
    Latents,
    PromptEmbeddings,
    prepare_image,
)

__all__ = [
    "DecodedMedia",
    "DecoderStage",
    "DenoiseState",
    "DenoiserStage",
    "GenerationSpec",
    "Latents",
    "LocalGenerator",
    "MuxInfo",
    "PromptEmbeddings",
    "TextEncoderStage",
    "mux_mp4",
    "prepare_image",
    "probe_mp4",
]
