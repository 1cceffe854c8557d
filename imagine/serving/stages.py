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
# a parallel denoiser replica whose rank group failed to rebuild this many times in a row asks Serve to replace it
MAX_FAILED_RESTARTS = 3


def served_preset(config: AppConfig) -> ModelPreset:
    """The configured preset, with the config's `source` override applied."""
    preset = get_preset(config.model.preset)
    if config.model.source:
        preset = preset.model_copy(update={"source": config.model.source})
    return preset


def served_edit_preset(config: AppConfig) -> ModelPreset | None:
    """The edit model preset (with the config's `source` override), or None when edits are off."""
    if not config.edit.enabled:
        return None
    preset = get_preset(config.edit.preset)
    if preset.family != "wan_vace":
        raise ValueError(f"edit.preset {preset.name!r} is a {preset.family} model; edits need a wan_vace preset")
    if config.edit.source:
        preset = preset.model_copy(update={"source": config.edit.source})
    return preset


def transformer_config(config: AppConfig) -> dict[str, Any]:
    """The served denoiser transformer's `config.json` (for the routing cost model), without loading weights:
    the builtin tiny model's config comes from code, a local directory's from its file."""
    import json

    preset = served_preset(config)
    if preset.is_builtin:
        from imagine.models.tiny import TRANSFORMER_CONFIG

        return dict(TRANSFORMER_CONFIG)
    if preset.is_s3:
        model_dir = resolve_model_dir(preset, config.home, endpoint_url=config.model.s3_endpoint_url)
    else:
        model_dir = Path(preset.source).expanduser()
    return json.loads((model_dir / "transformer" / "config.json").read_text())


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
        # (a parallel denoiser sets `components = []`: its ranks load the model instead)
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
        if not self.components:
            return {}
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
        # on the CPU: a parallel denoiser replica holds no GPU itself (its ranks do), so it cannot unpickle CUDA
        # tensors; the loop moves them to its device (a few hundred KB per prompt)
        return embeddings.to_cpu()


class _LocalLoop:
    """The sampling loop on this replica's device: `begin` / `step` / `snapshot` / `finish` over a DenoiserStage."""

    def __init__(self, stage: DenoiserStage):
        self.stage = stage
        self.state: DenoiseState | None = None
        self.embeddings: PromptEmbeddings | None = None

    def begin(self, spec: GenerationSpec, embeddings: PromptEmbeddings, resume: DenoiseState | None) -> tuple[int, int]:
        """Start (or resume) a loop; returns (steps done, steps in total)."""
        self.embeddings = embeddings
        self.state = resume if resume is not None else self.stage.prepare(spec, embeddings)
        return self.state.step_index, self.state.num_inference_steps

    def step(self) -> int:
        self.state = self.stage.step(self.state, self.embeddings)
        return self.state.step_index

    def snapshot(self) -> DenoiseState:
        """The loop state on the CPU (a checkpoint)."""
        return self.state.to_cpu()

    def finish(self) -> Latents:
        latents = self.stage.finish(self.state)
        self.state = self.embeddings = None
        return latents.to_cpu()


class DenoiserRank(_LocalLoop):
    """One rank of a parallel denoiser replica (built inside its Ray rank worker once the process group is up):
    loads the denoiser components, shards the transformer (sequence and/or tensor parallel) and runs the same
    loop as every other rank; rank 0's results are the replica's."""

    def __init__(self, config: AppConfig, pool: str, rank: int, world_size: int):
        from imagine.parallel import enable_parallel

        self.rank = rank
        self.config = config
        parallel = config.denoiser_pools()[pool].parallel
        device = config.model.device
        if device.startswith("cuda"):
            device = f"cuda:{torch.cuda.current_device()}"  # Ray gave this rank one GPU
        if config.model.torch_threads:
            torch.set_num_threads(config.model.torch_threads)
        model_dir = resolve_model_dir(served_preset(config), config.home, endpoint_url=config.model.s3_endpoint_url)
        loaded = load_components(model_dir, DenoiserStage.components, device, torch_dtype(config.model.dtype))
        self.parallel = enable_parallel(loaded["transformer"], sequence=parallel.sequence, tensor=parallel.tensor)
        super().__init__(DenoiserStage(loaded, device, torch_dtype(config.model.dtype)))

    def begin(self, spec, embeddings, resume):  # noqa: ANN001, ANN201 - see _LocalLoop.begin
        with torch.inference_mode():
            return super().begin(spec, embeddings, resume)

    def step(self) -> int:
        with torch.inference_mode():
            return super().step()

    def snapshot(self) -> DenoiseState | None:
        state = super().snapshot()
        return state if self.rank == 0 else None  # every rank holds the same state: only rank 0's travels

    def finish(self) -> Latents | None:
        with torch.inference_mode():
            latents = super().finish()
        return latents if self.rank == 0 else None


class _RankedLoop:
    """The sampling loop on a `RankGroup`: every call runs on all ranks (the state stays on them); rank 0's
    answer is returned. A dead or failed rank raises `RankFailure`; the group is rebuilt before the next job."""

    def __init__(self, group: Any):
        self.group = group
        self.failed_restarts = 0  # in a row; the replica reports itself unhealthy past MAX_FAILED_RESTARTS

    def begin(self, spec: GenerationSpec, embeddings: PromptEmbeddings, resume: DenoiseState | None) -> tuple[int, int]:
        if not self.group.healthy:
            logger.warning("rank group is broken; restarting it")
            try:
                self.group.restart()
            except Exception:
                self.failed_restarts += 1
                raise
            self.failed_restarts = 0
        return self.group.call("begin", spec, embeddings, resume)

    def step(self) -> int:
        return self.group.call("step")

    def snapshot(self) -> DenoiseState:
        return self.group.call("snapshot")

    def finish(self) -> Latents:
        return self.group.call("finish")


class DenoiserServer(_StageHost):
    """Sampling loop of one pool. Degree 1: the model runs in this replica. Degree N > 1: the replica holds a
    placement group of N GPU bundles (see `build_app`) and drives N rank workers that run the loop together."""

    components = DenoiserStage.components

    def __init__(self, config: AppConfig, pool: str = "denoiser"):
        self.pool = pool
        self.parallel = config.denoiser_pools()[pool].parallel
        if self.parallel.degree > 1:
            self.components = []  # the ranks load the model, not this replica
        super().__init__(config)
        self._denoising = 0
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))
        if self.parallel.degree > 1:
            self.group = self._start_group()
            self.loop: _LocalLoop | _RankedLoop = _RankedLoop(self.group)
        else:
            self.group = None
            self.stage = DenoiserStage(self.loaded, self.device, self.dtype)
            self.loop = _LocalLoop(self.stage)

    def _start_group(self) -> Any:
        import functools

        from imagine.serving.ranks import RankGroup

        device = "cuda" if self.config.model.device.startswith("cuda") else "cpu"
        group = RankGroup(
            self.parallel.degree,
            functools.partial(DenoiserRank, self.config, self.pool),
            device,
            cpus_per_rank=self.parallel.cpus_per_rank,
            declare_gpus=self.config.denoiser_pools()[self.pool].num_gpus > 0 or device == "cuda",
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

    async def denoise(self, job: JobRecord, spec: GenerationSpec, embeddings: PromptEmbeddings) -> DenoiseOutcome:
        """Denoise `job` (resuming from its checkpoint if it has one) and meter the device time used."""
        self._denoising += 1
        started = time.perf_counter()
        try:
            outcome = await self.run_on_torch_thread(
                self._denoise, job.id, job.attempt, spec, embeddings, job.checkpoint_key
            )
        except BaseException:
            # a failed attempt (a lost rank, say) held its devices too: bill its cost, once, like any attempt
            await asyncio.to_thread(self.meter, job, "denoiser", time.perf_counter() - started)
            raise
        finally:
            self._denoising -= 1
        await asyncio.to_thread(self.meter, job, "denoiser", outcome.device_seconds)
        return outcome

    def meter(self, job: JobRecord, stage: str, wall_s: float) -> None:
        """Device time = wall time x devices held (every rank of a parallel replica is busy for the whole loop)."""
        self.ledger.record(job, stage, wall_s * self.parallel.degree, self.device)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve autoscaling metrics (see `imagine.serving.autoscaling`): this pool's queue depth and
        whether this replica is denoising."""
        depth = await asyncio.to_thread(self.store.queue_depth, self.pool)
        return {"queued_jobs": float(sum(depth.values())), "denoising": float(self._denoising)}

    def _load_checkpoint(self, key: str) -> DenoiseState:
        return torch.load(io.BytesIO(self.artifacts.read_bytes(key)), map_location="cpu", weights_only=False)

    def _denoise(
        self, job_id: str, attempt: int, spec: GenerationSpec, embeddings: PromptEmbeddings, resume_from: str | None
    ) -> DenoiseOutcome:
        """The sampling loop, step by step. After every step: record progress, then stop if the job was
        cancelled, or checkpoint the loop state and give the slot back if it is being preempted."""
        started = time.perf_counter()
        resume = self._load_checkpoint(resume_from) if resume_from else None
        step_index, total = self.loop.begin(spec, embeddings, resume)
        first_step = step_index

        def outcome(status: str, latents: Latents | None = None, key: str | None = None) -> DenoiseOutcome:
            return DenoiseOutcome(latents, status, step_index - first_step, time.perf_counter() - started, key)

        every = self.config.progress_every_steps
        signal = self.store.report_progress(job_id, attempt, DENOISE_PROGRESS_SHARE * step_index / total)
        if signal == StepSignal.CANCEL:  # cancelled while it waited for this replica
            return outcome("cancelled")
        while step_index < total:
            step_index = self.loop.step()
            if step_index % every and step_index < total:
                continue
            signal = self.store.report_progress(job_id, attempt, DENOISE_PROGRESS_SHARE * step_index / total)
            if signal == StepSignal.CANCEL:
                logger.info("job %s cancelled after step %d", job_id, step_index)
                return outcome("cancelled")
            if signal == StepSignal.PREEMPT and step_index < total:
                buf = io.BytesIO()
                torch.save(self.loop.snapshot(), buf)
                key = checkpoint_key_for(job_id)
                self.artifacts.put_bytes(key, buf.getvalue())
                logger.info("job %s preempted after step %d", job_id, step_index)
                return outcome("preempted", key=key)
        return outcome("done", latents=self.loop.finish())


class DecoderServer(_StageHost):
    """Decode + mux + store in one replica, so full-size frames never cross process boundaries."""

    components = DecoderStage.components

    def __init__(self, config: AppConfig):
        super().__init__(config)
        self.stage = DecoderStage(self.loaded, self.device, self.dtype, tiling=config.decode_tiling or False)
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
