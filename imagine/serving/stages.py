"""Ray Serve hosts for the pipeline stages. Plain classes (the builder applies `serve.deployment`):
each loads only the components its stage needs and calls the stage; no model math here."""

from __future__ import annotations

import asyncio
import io
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from imagine.config import AppConfig
from imagine.jobs import JobRecord, JobStore, StepSignal
from imagine.jobs.ledger import Ledger
from imagine.models.loading import load_components, resolve_model_dir
from imagine.models.presets import ModelPreset, get_preset
from imagine.pipeline.decode import DecoderStage
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.mux import mux_mp4
from imagine.pipeline.types import DenoiseState, GenerationSpec, Latents, PromptEmbeddings
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


@dataclass
class DenoiseOutcome:
    """A denoiser's answer: latents; or cancelled; or preempted with the key of its checkpoint."""

    latents: Latents | None
    status: str  # "done" | "cancelled" | "preempted"
    steps_run: int  # steps executed by this call
    device_seconds: float
    checkpoint_key: str | None = None


def checkpoint_key_for(job_id: str) -> str:
    return f"checkpoints/{job_id}/denoise_state.pt"


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
        self.store = JobStore(config.resolved_database_url)
        self.ledger = Ledger(self.store.engine, config.accounting)

    def meter(self, job: JobRecord, stage: str, wall_s: float) -> None:
        """Write this stage's device time for this attempt to the ledger (exactly once per attempt)."""
        self.ledger.record(job, stage, wall_s, self.device)

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

    async def encode(self, job: JobRecord, prompt: str, negative_prompt: str, guidance: bool) -> PromptEmbeddings:
        return await self.run_on_torch_thread(self._encode, job, prompt, negative_prompt, guidance)

    def _encode(self, job: JobRecord, prompt: str, negative_prompt: str, guidance: bool) -> PromptEmbeddings:
        started = time.perf_counter()
        embeddings = self.stage(prompt, negative_prompt, guidance)
        self.meter(job, "text_encoder", time.perf_counter() - started)
        return embeddings


class DenoiserServer(_StageHost):
    components = DenoiserStage.components

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.stage = DenoiserStage(self.loaded, self.device, self.dtype)
        self._denoising = 0
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))

    async def denoise(self, job: JobRecord, spec: GenerationSpec, embeddings: PromptEmbeddings) -> DenoiseOutcome:
        """Denoise `job` (resuming from its checkpoint if it has one) and meter the device time used."""
        self._denoising += 1
        try:
            outcome = await self.run_on_torch_thread(
                self._denoise, job.id, job.attempt, spec, embeddings, job.checkpoint_key
            )
        finally:
            self._denoising -= 1
        await asyncio.to_thread(self.meter, job, "denoiser", outcome.device_seconds)
        return outcome

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve autoscaling metrics (see `imagine.serving.autoscaling`): the store's queue depth and
        whether this replica is denoising."""
        depth = await asyncio.to_thread(self.store.queue_depth)
        return {"queued_jobs": float(sum(depth.values())), "denoising": float(self._denoising)}

    def _load_checkpoint(self, key: str) -> DenoiseState:
        return torch.load(io.BytesIO(self.artifacts.read_bytes(key)), map_location="cpu", weights_only=False)

    def _denoise(
        self, job_id: str, attempt: int, spec: GenerationSpec, embeddings: PromptEmbeddings, resume_from: str | None
    ) -> DenoiseOutcome:
        """The sampling loop, step by step. After every step: record progress, then stop if the job was
        cancelled, or checkpoint the loop state and give the slot back if it is being preempted."""
        started = time.perf_counter()
        state = self._load_checkpoint(resume_from) if resume_from else self.stage.prepare(spec, embeddings)
        first_step = state.step_index
        every = self.config.progress_every_steps

        def outcome(status: str, latents: Latents | None = None, key: str | None = None) -> DenoiseOutcome:
            return DenoiseOutcome(latents, status, state.step_index - first_step, time.perf_counter() - started, key)

        total = state.num_inference_steps
        signal = self.store.report_progress(job_id, attempt, DENOISE_PROGRESS_SHARE * state.step_index / total)
        if signal == StepSignal.CANCEL:  # cancelled while it waited for this replica
            return outcome("cancelled")
        while not state.done:
            state = self.stage.step(state, embeddings)
            if state.step_index % every and not state.done:
                continue
            signal = self.store.report_progress(job_id, attempt, DENOISE_PROGRESS_SHARE * state.step_index / total)
            if signal == StepSignal.CANCEL:
                logger.info("job %s cancelled after step %d", job_id, state.step_index)
                return outcome("cancelled")
            if signal == StepSignal.PREEMPT and not state.done:
                buf = io.BytesIO()
                torch.save(state.to_cpu(), buf)
                key = checkpoint_key_for(job_id)
                self.artifacts.put_bytes(key, buf.getvalue())
                logger.info("job %s preempted after step %d", job_id, state.step_index)
                return outcome("preempted", key=key)
        return outcome("done", latents=self.stage.finish(state))


class DecoderServer(_StageHost):
    """Decode + mux + store in one replica, so full-size frames never cross process boundaries."""

    components = DecoderStage.components

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.stage = DecoderStage(self.loaded, self.device, self.dtype)
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))

    async def decode(self, job: JobRecord, latents: Latents, artifact_key: str) -> dict[str, Any]:
        return await self.run_on_torch_thread(self._decode, job, latents, artifact_key)

    def _decode(self, job: JobRecord, latents: Latents, artifact_key: str) -> dict[str, Any]:
        started = time.perf_counter()
        media = self.stage(latents)
        decoded = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="imagine-mux-") as tmp:
            path = Path(tmp) / "video.mp4"
            info = mux_mp4(media, path, crf=self.config.mp4_crf, preset=self.config.mp4_preset)
            size = self.artifacts.put_file(artifact_key, path)
        self.meter(job, "decoder", time.perf_counter() - started)
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
