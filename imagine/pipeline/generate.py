"""In-process composition of the three stages (encode -> denoise -> decode); the reference and benchmark path."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from imagine.models.loading import load_components
from imagine.pipeline.decode import DecoderStage
from imagine.pipeline.denoise import DenoiserStage, StepHook
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.types import DecodedMedia, GenerationSpec


@dataclass
class StageTimings:
    """Wall seconds spent in each stage by the last `LocalGenerator.generate` call."""

    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    steps: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.encode_s + self.denoise_s + self.decode_s


class LocalGenerator:
    """Loads one model directory once and generates clips with all stages in this process."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        names = sorted(set(TextEncoderStage.components + DenoiserStage.components + DecoderStage.components))
        components = load_components(Path(model_dir), names, device, dtype)
        self.encoder = TextEncoderStage(components, device, dtype)
        self.denoiser = DenoiserStage(components, device, dtype)
        self.decoder = DecoderStage(components, device, dtype)
        self.last_timings = StageTimings()

    def generate(self, spec: GenerationSpec, step_hook: StepHook | None = None) -> DecodedMedia:
        self.denoiser.validate(spec)  # fail before spending time on the text encoder
        timings = StageTimings()
        start = time.perf_counter()
        embeddings = self.encoder(spec.prompt, spec.negative_prompt, guidance=spec.do_classifier_free_guidance)
        timings.encode_s = time.perf_counter() - start

        start = time.perf_counter()
        last = start

        def timed_hook(done: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            timings.steps.append(now - last)
            last = now
            if step_hook is not None:
                step_hook(done, total)

        latents = self.denoiser(spec, embeddings, step_hook=timed_hook)
        timings.denoise_s = time.perf_counter() - start

        start = time.perf_counter()
        media = self.decoder(latents)
        timings.decode_s = time.perf_counter() - start
        self.last_timings = timings
        return media
