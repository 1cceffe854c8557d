"""Ray Serve hosts for the pipeline stages. Plain classes (the builder applies `serve.deployment`):
each loads only the components its stage needs and calls the stage; no model math here."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from imagine.config import AppConfig
from imagine.jobs import JobStore
from imagine.models.loading import load_components, resolve_model_dir
from imagine.models.presets import ModelPreset, get_preset
from imagine.pipeline.decode import DecoderStage
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.mux import mux_mp4
from imagine.pipeline.types import GenerationSpec, Latents, PromptEmbeddings
from imagine.storage import open_artifact_store

logger = logging.getLogger(__name__)
T = TypeVar("T")

# share of job progress the denoising loop covers; decode + mux + store take the rest
DENOISE_PROGRESS_SHARE = 0.95


def served_preset(config: AppConfig) -> ModelPreset:
    """The configured preset, with the config's `source` override applied."""
    preset = get_preset(config.model.preset)
    if config.model.source:
        preset = preset.model_copy(update={"source": config.model.source})
    return preset


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class JobCancelled(Exception):
    """Raised from the step hook to stop a sampling loop whose job was cancelled."""


@dataclass
class DenoiseOutcome:
    """A denoiser's answer: latents, or a note that the job was cancelled after `steps_run` steps."""

    latents: Latents | None
    cancelled: bool
    steps_run: int
    device_seconds: float


class _StageHost:
    """Loads one stage's components from the served preset onto the configured device, and runs all of
    the replica's torch work on ONE dedicated thread.

    Why one thread: Serve runs sync methods on a thread pool, and every thread that enters an OpenMP
    region gets its own team, whose spinning workers then compete with the others' for the cores:
    measured on 2 cores, the tiny 2 s 480p denoise took 0.58 s from a second thread vs 0.42 s from a
    single one. A single thread also serialises requests on the device, which is what one device wants.
    """

    components: list[str] = []

    def __init__(self, config: AppConfig):
        self.config = config
        self.device = config.model.device
        self.dtype = torch_dtype(config.model.dtype)
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{type(self).__name__}-torch")
        self.loaded = self._torch_thread.submit(self._load).result()

    def _load(self) -> dict[str, Any]:
        if self.config.model.torch_threads:
            torch.set_num_threads(self.config.model.torch_threads)
        started = time.perf_counter()
        model_dir = resolve_model_dir(served_preset(self.config), self.config.home, endpoint_url=self.config.model.s3_endpoint_url)
        loaded = load_components(model_dir, self.components, self.device, self.dtype)
        logger.info("%s loaded %s from %s in %.2fs", type(self).__name__, self.components, model_dir, time.perf_counter() - started)
        return loaded

    async def run_on_torch_thread(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, call)

    def check_health(self) -> None:
        """Serve health check: the replica is healthy once constructed."""


class TextEncoderServer(_StageHost):
    components = TextEncoderStage.components

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.stage = TextEncoderStage(self.loaded, self.device, self.dtype)

    async def encode(self, prompt: str, negative_prompt: str, guidance: bool) -> PromptEmbeddings:
        return await self.run_on_torch_thread(self.stage, prompt, negative_prompt, guidance)


class DenoiserServer(_StageHost):
    components = DenoiserStage.components

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.stage = DenoiserStage(self.loaded, self.device, self.dtype)
        self.store = JobStore(config.resolved_database_url)

    async def denoise(
        self, job_id: str, attempt: int, spec: GenerationSpec, embeddings: PromptEmbeddings
    ) -> DenoiseOutcome:
        return await self.run_on_torch_thread(self._denoise, job_id, attempt, spec, embeddings)

    def _denoise(self, job_id: str, attempt: int, spec: GenerationSpec, embeddings: PromptEmbeddings) -> DenoiseOutcome:
        """Run the sampling loop; after every step record progress and stop if the job was cancelled."""
        started = time.perf_counter()
        every = self.config.progress_every_steps
        steps_run = 0

        def step_hook(step: int, total: int) -> None:
            nonlocal steps_run
            steps_run = step
            if step % every == 0 or step == total:
                if self.store.report_progress(job_id, attempt, DENOISE_PROGRESS_SHARE * step / total):
                    raise JobCancelled(job_id)

        def outcome(latents: Latents | None) -> DenoiseOutcome:
            return DenoiseOutcome(latents, latents is None, steps_run, time.perf_counter() - started)

        if self.store.report_progress(job_id, attempt, 0.0):  # cancelled while it was being encoded
            return outcome(None)
        try:
            latents = self.stage(spec, embeddings, step_hook=step_hook)
        except JobCancelled:
            logger.info("job %s cancelled after %d step(s)", job_id, steps_run)
            return outcome(None)
        return outcome(latents)


class DecoderServer(_StageHost):
    """Decode + mux + store in one replica, so full-size frames never cross process boundaries."""

    components = DecoderStage.components

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.stage = DecoderStage(self.loaded, self.device, self.dtype)
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))

    async def decode(self, job_id: str, latents: Latents, artifact_key: str) -> dict[str, Any]:
        return await self.run_on_torch_thread(self._decode, job_id, latents, artifact_key)

    def _decode(self, job_id: str, latents: Latents, artifact_key: str) -> dict[str, Any]:
        started = time.perf_counter()
        media = self.stage(latents)
        decoded = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="imagine-mux-") as tmp:
            path = Path(tmp) / "video.mp4"
            info = mux_mp4(media, path, crf=self.config.mp4_crf, preset=self.config.mp4_preset)
            size = self.artifacts.put_file(artifact_key, path)
        return {
            "stage_seconds": {"decode": decoded - started, "mux_store": time.perf_counter() - decoded},
            "artifact_key": artifact_key,
            "bytes": size,
            "duration_s": info.duration_s,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "num_frames": info.num_frames,
            "audio_duration_s": info.audio_duration_s,
            "has_audio": True,
        }
