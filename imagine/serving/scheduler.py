"""The scheduler deployment (one replica): hosts the `Dispatcher` and runs each claimed job through
encoder -> denoiser -> decoder handles. Its state is the job store, so a restart just re-queues."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any, Callable

from PIL import Image

from imagine.api.service import output_video_key
from imagine.config import AppConfig
from imagine.jobs import JobRecord, JobStore
from imagine.jobs.ledger import Ledger
from imagine.pipeline.types import GenerationSpec, prepare_image
from imagine.scheduling.dispatcher import Dispatcher
from imagine.scheduling.policy import FairSharePolicy
from imagine.storage import ArtifactStore, open_artifact_store

logger = logging.getLogger(__name__)


def spec_from_job(job: JobRecord, artifacts: ArtifactStore) -> GenerationSpec:
    """The stage input for a stored generation job (loads its first-frame image, if any)."""
    p = job.params
    image = None
    if p.get("image_key"):
        with Image.open(io.BytesIO(artifacts.read_bytes(p["image_key"]))) as img:
            image = prepare_image(img.convert("RGB"), p["width"], p["height"])
    return GenerationSpec(
        prompt=p["prompt"],
        negative_prompt=p["negative_prompt"],
        width=p["width"],
        height=p["height"],
        num_frames=p["num_frames"],
        fps=p["fps"],
        num_inference_steps=p["num_inference_steps"],
        guidance_scale=p["guidance_scale"],
        seed=p["seed"],
        image=image,
    )


def _error(code: str, exc: BaseException) -> dict[str, str]:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError carries the replica's exception as .cause
    return {"type": "server_error", "code": code, "message": f"{type(cause).__name__}: {cause}"[:1000]}


class SchedulerServer:
    async def __init__(self, config: AppConfig, encoder: Any, denoiser: Any, decoder: Any):
        self.config = config
        self.store = JobStore(config.resolved_database_url)
        self.artifacts = open_artifact_store(str(config.resolved_artifacts_dir))
        self.encoder, self.denoiser, self.decoder = encoder, denoiser, decoder
        sched = config.scheduling
        self.dispatcher = Dispatcher(
            self.store,
            self.run_job,
            config.resolved_max_inflight_jobs,
            config.poll_interval_s,
            policy=FairSharePolicy(sched.aging_s, sched.tenant_weights),
            preemption=sched.preemption,
            max_preemptions=sched.max_preemptions_per_job,
            paused=sched.paused,
        )
        self.ledger = Ledger(self.store.engine, config.accounting)
        await asyncio.to_thread(self.dispatcher.recover)
        await asyncio.to_thread(self.ledger.bill_missing, self.store)  # done but unbilled (crash in between)
        loop = asyncio.get_running_loop()
        self._loop_task = loop.create_task(self.dispatcher.run_forever())
        self._capacity_task = None
        if config.max_inflight_jobs is None:  # follow the denoiser replicas that are up right now
            self.dispatcher.set_capacity(config.denoiser.max_ongoing_requests * config.denoiser.autoscaling.min_replicas or 1)
            self._capacity_task = loop.create_task(self._track_denoiser_capacity())

    async def _track_denoiser_capacity(self) -> None:
        from ray import serve

        app = serve.get_replica_context().app_name
        per_replica = self.config.denoiser.max_ongoing_requests
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                application = status.applications.get(app)
                deployment = application.deployments.get("Denoiser") if application else None
                if deployment is not None:  # absent while the app is still being deployed
                    running = deployment.replica_states.get("RUNNING", 0)
                    self.dispatcher.set_capacity(max(1, running * per_replica))
            except Exception:  # status is advisory: keep the last capacity on a hiccup
                logger.exception("could not read the denoiser replica count")
            await asyncio.sleep(1.0)

    async def nudge(self) -> None:
        self.dispatcher.nudge()

    async def running(self) -> list[str]:
        return self.dispatcher.running_ids

    async def check_health(self) -> None:
        if self._loop_task.done():
            raise RuntimeError(f"dispatch loop stopped: {self._loop_task.exception()!r}")

    async def run_job(self, job: JobRecord, release_slot: Callable[[], None]) -> None:
        store = self.store
        try:
            spec = await asyncio.to_thread(spec_from_job, job, self.artifacts)
            embeddings = self.encoder.encode.remote(job, spec.prompt, spec.negative_prompt, spec.guidance_scale > 1.0)
            outcome = await self.denoiser.denoise.remote(job, spec, embeddings)
            release_slot()  # the denoiser is free: the next job may start while this one decodes
            if outcome.status == "cancelled":
                await asyncio.to_thread(store.mark_cancelled, job.id, job.attempt)
                return
            if outcome.status == "preempted":
                await asyncio.to_thread(store.requeue_preempted, job.id, job.attempt, outcome.checkpoint_key)
                self.dispatcher.nudge()
                return
            result = await self.decoder.decode.remote(job, outcome.latents, output_video_key(job.id))
            result["stage_seconds"]["denoise"] = outcome.device_seconds
            if not await asyncio.to_thread(store.complete, job.id, job.attempt, result):
                logger.info("job %s attempt %d finished but is no longer current; result dropped", job.id, job.attempt)
                return
            await asyncio.to_thread(self.ledger.bill, job, result["duration_s"])
            if job.checkpoint_key:
                await asyncio.to_thread(self.artifacts.delete, job.checkpoint_key)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any stage failure fails this job, not the scheduler
            logger.exception("job %s failed", job.id)
            await asyncio.to_thread(store.fail, job.id, job.attempt, _error("generation_failed", e))
