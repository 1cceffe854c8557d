"""Ray Serve hosts for the generation stages and the denoiser pools. Plain classes (the builder applies
`serve.deployment`): each loads only the components its stage needs and calls the stage; no model math here,
and no sampling-loop logic either (that is `imagine.serving.runner.SamplingRunner`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from imagine.config import AppConfig
from imagine.jobs import JobRecord, JobStore
from imagine.jobs.ledger import Ledger
from imagine.models.loading import load_components
from imagine.models.presets import ModelPreset
from imagine.pipeline.decode import DecoderStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.media import MediaInfo, mux_mp4
from imagine.pipeline.stills import store_stills
from imagine.pipeline.types import Latents, PromptEmbeddings
from imagine.serving.ranks import RankedLoop
from imagine.serving.runner import LocalLoop, SampleOutcome, SamplingRunner
from imagine.serving.samplers import (
    configure_torch,
    load_pool_sampler,
    pool_setup_timeout_s,
    preset_dir,
    served_preset,
    torch_dtype,
)
from imagine.storage import open_artifact_store
from imagine.storage.keys import checkpoint_key

logger = logging.getLogger(__name__)
T = TypeVar("T")

# a parallel denoiser replica whose rank group failed to rebuild this many times in a row asks Serve to replace it
MAX_FAILED_RESTARTS = 3


def video_result(artifact_key: str, size: int, info: MediaInfo, stage_seconds: dict[str, float], **extra: Any) -> dict[str, Any]:
    """A done job's stored result: where its MP4 is and what it holds (what the API renders as `video`)."""
    return {
        "stage_seconds": stage_seconds,
        "artifact_key": artifact_key,
        "bytes": size,
        "duration_s": info.duration_s,
        "width": info.width,
        "height": info.height,
        "fps": info.fps,
        "num_frames": info.num_frames,
        "audio_duration_s": info.audio_duration_s,
        "has_audio": info.has_audio,
        **extra,
    }


class StageHost:
    """Loads one stage's components of `preset` onto the configured device, and runs all of the replica's torch
    work on ONE dedicated thread.

    Why one thread: Serve runs sync methods on a thread pool, and every thread that enters an OpenMP
    region gets its own team, whose spinning workers then compete with the others' for the cores:
    measured on 2 cores, the tiny 2 s 480p denoise took 0.58 s from a second thread vs 0.42 s from a
    single one. A single thread also serialises requests on the device, which is what one device wants.
    """

    def __init__(self, config: AppConfig, preset: ModelPreset | None = None, components: Sequence[str] = ()):
        self.config = config
        self.device = config.model.device
        self.dtype = torch_dtype(config.model.resolved_dtype)
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{type(self).__name__}-torch")
        self.loaded = self.on_torch_thread(self._load, preset, list(components))
        self.store = JobStore(config.resolved_database_url, migrate=config.migrate_on_start)
        self.ledger = Ledger(self.store.engine, config.accounting)
        self.artifacts = open_artifact_store(config)

    def on_torch_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the torch thread and wait (construction-time loading)."""
        return self._torch_thread.submit(fn, *args).result()

    def meter(self, job: JobRecord, stage: str, wall_s: float) -> None:
        """Write this stage's device time for this attempt to the ledger (exactly once per attempt)."""
        self.ledger.record(job, stage, wall_s, self.device)

    def _load(self, preset: ModelPreset | None, components: list[str]) -> dict[str, Any]:
        configure_torch(self.config)  # on the torch thread, before anything runs there
        if preset is None or not components:
            return {}
        started = time.perf_counter()
        model_dir = preset_dir(self.config, preset)
        loaded = load_components(model_dir, components, self.device, self.dtype)
        logger.info("%s loaded %s from %s in %.2fs", type(self).__name__, components, model_dir, time.perf_counter() - started)
        return loaded

    async def run_on_torch_thread(self, fn: Callable[..., T], *args: Any) -> T:
        def call() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._torch_thread, call)

    def check_health(self) -> None:
        """Serve health check: the replica is healthy once constructed."""


class TextEncoderServer(StageHost):
    def __init__(self, config: AppConfig):
        super().__init__(config, served_preset(config), TextEncoderStage.components)
        self.stage = TextEncoderStage(self.loaded, self.device, self.dtype)

    async def encode(self, job: JobRecord, prompt: str, negative_prompt: str, guidance: bool) -> PromptEmbeddings:
        return await self.run_on_torch_thread(self._encode, job, prompt, negative_prompt, guidance)

    def _encode(self, job: JobRecord, prompt: str, negative_prompt: str, guidance: bool) -> PromptEmbeddings:
        started = time.perf_counter()
        embeddings = self.stage(prompt, negative_prompt, guidance)
        self.meter(job, "text_encoder", time.perf_counter() - started)
        # on the CPU: a parallel denoiser replica holds no GPU itself (its ranks do), so it cannot unpickle CUDA
        # tensors; the loop moves them to its device (a few hundred KB per prompt)
        return embeddings.to_cpu()


class DenoiserServer(StageHost):
    """One denoiser pool: the sampler of the pool's preset (LTX-2 for generation pools, Wan VACE for `editor`)
    driven by a `SamplingRunner`. Degree 1: the model runs in this replica. Degree N > 1: the replica holds a
    placement group of N GPU bundles (see `build_app`) and drives N rank workers that run the loop together."""

    def __init__(self, config: AppConfig, pool: str = "denoiser"):
        self.pool = pool
        self.parallel = config.sampler_pools()[pool].parallel
        super().__init__(config)  # loads nothing itself: the sampler (or its ranks) load the pool's model
        self._denoising = 0
        if self.parallel.degree > 1:
            self.group = self._start_group()
            self.loop: LocalLoop | RankedLoop = RankedLoop(self.group)
        else:
            self.group = None
            sampler, _ = self.on_torch_thread(load_pool_sampler, config, pool, self.device)
            self.loop = LocalLoop(sampler)
        self.runner = SamplingRunner(self.loop, self.artifacts, progress_every=config.progress_every_steps)

    def _start_group(self) -> Any:
        from imagine.serving.ranks import RankGroup
        from imagine.serving.samplers import SamplerRank

        device = "cuda" if self.config.model.on_cuda else "cpu"
        group = RankGroup(
            self.parallel.degree,
            functools.partial(SamplerRank, self.config, self.pool),
            device,
            cpus_per_rank=self.parallel.cpus_per_rank,
            declare_gpus=self.config.ranks_hold_gpus(self.pool),
            setup_timeout_s=pool_setup_timeout_s(self.config, self.pool),  # fetches the model here, once per node
            collective_timeout_s=self.parallel.timeout_s,
        )
        group.start()
        return group

    async def check_health(self) -> None:
        """A broken group is rebuilt at the next job; a group that cannot answer pings, or that failed to rebuild
        `MAX_FAILED_RESTARTS` times in a row (a bad device, say), marks the replica unhealthy: Serve then replaces
        it, placement group and all, possibly on another node."""
        if self.group is None:
            return
        if self.loop.failed_restarts >= MAX_FAILED_RESTARTS:
            raise RuntimeError(f"the rank group failed to restart {self.loop.failed_restarts} times in a row")
        if self.group.healthy:
            await asyncio.to_thread(self.group.check_health)

    async def denoise(self, job: JobRecord, request: Any, conditioning: Any) -> SampleOutcome:
        """Sample `job` (resuming from its checkpoint if it has one) and meter the device time used."""
        self._denoising += 1
        started = time.perf_counter()
        report = functools.partial(self.store.report_progress, job.id, job.attempt)
        try:
            outcome = await self.run_on_torch_thread(
                functools.partial(
                    self.runner.run, request, conditioning, report, checkpoint_key=checkpoint_key(job.tenant, job.id),
                    resume_from=job.checkpoint_key, label=f"job {job.id}",
                )
            )
        except BaseException:
            # a failed attempt (a lost rank, say) held its devices too: bill its cost, once, like any attempt
            await asyncio.to_thread(self.meter, job, "denoiser", time.perf_counter() - started)
            raise
        finally:
            self._denoising -= 1
        await asyncio.to_thread(self.meter, job, "denoiser", outcome.seconds)
        return outcome

    def meter(self, job: JobRecord, stage: str, wall_s: float) -> None:
        """Device time = wall time x devices held (every rank of a parallel replica is busy for the whole loop)."""
        self.ledger.record(job, stage, wall_s * self.parallel.degree, self.device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve autoscaling metric (see `imagine.serving.autoscaling`): whether this replica is denoising (the
        pool's queue depth the policy reads from the store itself)."""
        return {"denoising": float(self._denoising)}


class DecoderServer(StageHost):
    """Decode + mux + store in one replica, so full-size frames never cross process boundaries."""

    def __init__(self, config: AppConfig):
        super().__init__(config, served_preset(config), DecoderStage.components)
        self.stage = DecoderStage(self.loaded, self.device, self.dtype, tiling=config.decode_tiling or False)

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
        stills = store_stills(self.artifacts, artifact_key, media.frames)
        self.meter(job, "decoder", time.perf_counter() - started)
        stage_seconds = {"decode": decoded - started, "mux_store": time.perf_counter() - decoded}
        return video_result(artifact_key, size, info, stage_seconds, artifact_keys=stills)
