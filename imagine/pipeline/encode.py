"""Text-encoder stage: prompt (+ negative prompt) -> Gemma hidden states -> LTX-2 text connectors.

Runs diffusers' own `LTX2Pipeline.encode_prompt` and connectors call on a pipeline view that holds only the
tokenizer, text encoder and connectors, so the math is exactly diffusers'.
"""

from __future__ import annotations

from typing import Any

import torch

from imagine.pipeline.types import PromptEmbeddings, require_components

TEXT_ENCODER_COMPONENTS = ["tokenizer", "text_encoder", "connectors"]


class TextEncoderStage:
    """Encodes prompts into `PromptEmbeddings` (connector outputs; negative row first when CFG is on)."""

    components = TEXT_ENCODER_COMPONENTS

    def __init__(
        self,
        components: dict[str, Any],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 1024,
    ):
        from diffusers import LTX2Pipeline

        require_components("TextEncoderStage", components, TEXT_ENCODER_COMPONENTS)
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self._pipe = LTX2Pipeline(
            scheduler=None,
            vae=None,
            audio_vae=None,
            text_encoder=components["text_encoder"],
            tokenizer=components["tokenizer"],
            connectors=components["connectors"],
            transformer=None,
            vocoder=None,
        )

    @torch.no_grad()
    def __call__(self, prompt: str, negative_prompt: str = "", guidance: bool = True) -> PromptEmbeddings:
        """Encode one prompt; with `guidance`, also the negative prompt (for classifier-free guidance)."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a str, got {type(negative_prompt).__name__}")
        pipe = self._pipe
        prompt_embeds, prompt_mask, negative_embeds, negative_mask = pipe.encode_prompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            do_classifier_free_guidance=guidance,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
        )
        if guidance:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds], dim=0)
            prompt_mask = torch.cat([negative_mask, prompt_mask], dim=0)
        padding_side = getattr(pipe.tokenizer, "padding_side", "left")
        video_embeds, audio_embeds, attention_mask = pipe.connectors(
            prompt_embeds, prompt_mask, padding_side=padding_side
        )
        return PromptEmbeddings(
            video_embeds=video_embeds.to(self.dtype),
            audio_embeds=audio_embeds.to(self.dtype),
            attention_mask=attention_mask,
            classifier_free_guidance=guidance,
        )
