"""The scheduler deployment (one replica): hosts the `Dispatcher` and runs each claimed job through its stages:
generation: text encoder -> a denoiser pool -> decoder; edit: (grounder) -> edit codec -> the `editor` denoiser
pool -> edit codec. Every job kind samples through the same pool protocol (`DenoiserServer.denoise`), so
cancel, preemption and retry work the same for all. Its state is the job store, so a restart just re-queues."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image

from imagine.config import EDIT_POOL, AppConfig
from imagine.editing.prompts import edit_prompt
from imagine.jobs import JobRecord, JobStore
from imagine.jobs.ledger import Ledger
from imagine.pipeline.types import GenerationSpec, prepare_image
from imagine.pipeline.vace import EditSpec
from imagine.scheduling.dispatcher import Dispatcher
from imagine.scheduling.policy import FairSharePolicy
from imagine.serving.edits import has_grounded_masks, needs_grounding
from imagine.serving.ranks import RankFailure
from imagine.serving.runner import SampleOutcome
from imagine.storage import ArtifactStore, open_artifact_store
from imagine.storage.keys import output_video_key
from imagine.storage.retention import Sweeper

logger = logging.getLogger(__name__)


def spec_from_job(job: JobRecord, artifacts: ArtifactStore) -> GenerationSpec:
    """The stage input for a stored generation job (loads its first-frame image, if any)."""
    p = job.params
    image = None
    if p.image_key is not None:
        with Image.open(io.BytesIO(artifacts.read_bytes(p.image_key))) as img:
            image = prepare_image(img.convert("RGB"), p.width, p.height)
    return GenerationSpec(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        width=p.width,
        height=p.height,
        num_frames=p.num_frames,
        fps=p.fps,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        seed=p.seed,
        image=image,
    )


def edit_spec_from_job(job: JobRecord) -> EditSpec:
    """The stage input for a stored edit job: the repaint prompts derived from its instruction."""
    p = job.params
    text = edit_prompt(p.instruction, p.prompt, p.negative_prompt)
    return EditSpec(text.prompt, text.negative_prompt, p.seed, p.num_inference_steps, p.guidance_scale)


def replica_lost_errors() -> tuple[type[BaseException], ...]:
    """What a stage call raises when the replica (or its node, or a rank) died under it rather than the job being
    wrong: the job is re-queued for another attempt (from its checkpoint, if it has one), not failed."""
    import ray.exceptions as rex
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (RankFailure, rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError,
            rex.LocalRayletDiedError, ReplicaUnavailableError, DeploymentUnavailableError)


def _error(code: str, exc: BaseException, job_id: str) -> dict[str, str]:
    """The job's client-visible error, in the service's words: an Imagine exception's own message (it is about the
    request: a target not found, an unreadable source); anything else (Ray's actor ids, pids and addresses, a
    library's traceback text) stays in the logs, which carry the job id."""
    cause = getattr(exc, "cause", None) or exc  # RayTaskError carries the replica's exception as .cause
    if caused_by(exc, replica_lost_errors()):
        message = "the service lost the replica running this job more often than its retries allow"
    elif type(cause).__module__.startswith("imagine."):
        message = f"{type(cause).__name__}: {cause}"
    else:
        message = f"an internal error stopped this job (search the service logs for job {job_id})"
    return {"type": "server_error", "code": code, "message": message[:1000]}


def caused_by(exc: BaseException, kind: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether `exc`, the replica exception a RayTaskError wraps (`.cause`), or anything in their chains is a
    `kind`."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return True
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return False


def denoiser_deployment_name(pool: str) -> str:
    """The Serve deployment of a denoiser pool."""
    if pool == EDIT_POOL:
        return "Editor"
    return "Denoiser" if pool == "denoiser" else f"Denoiser-{pool}"


class SchedulerServer:
    async def __init__(
        self,
        config: AppConfig,
        encoder: Any,
        denoisers: dict[str, Any],
        decoder: Any,
        grounder: Any = None,
        edit_codec: Any = None,
    ):
        self.config = config
        self.store = JobStore(config.resolved_database_url, migrate=config.migrate_on_start)
        self.artifacts = open_artifact_store(config)
        self.encoder, self.denoisers, self.decoder = encoder, denoisers, decoder
        self.grounder, self.edit_codec = grounder, edit_codec
        sched = config.scheduling
        # slots per pool: none until Serve reports the pool's RUNNING replicas (`_track_capacity`), so a job never
        # goes to a replica that is still starting or cannot be placed; a fixed `max_inflight_jobs` is used as is
        self._pool_configs = {pool: cfg for pool, cfg in config.sampler_pools().items() if pool in denoisers}
        capacity = {pool: 0 for pool in self._pool_configs}
        if config.max_inflight_jobs is not None:
            capacity["denoiser"] = config.max_inflight_jobs
        self.dispatcher = Dispatcher(
            self.store,
            self.run_job,
            capacity,
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
        self._capacity_task = loop.create_task(self._track_capacity())
        self.sweeper = Sweeper(self.store, self.artifacts, config.retention.sweep_batch)
        self._sweep_task = loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """Retention (`imagine.storage.retention`): every `sweep_interval_s`, delete ended jobs' inputs and work
        files and expired outputs."""
        while True:
            try:
                await asyncio.to_thread(self.sweeper.sweep)
            except Exception:  # an artifact-store hiccup: the next pass retries (every step is idempotent)
                logger.exception("retention sweep failed")
            await asyncio.sleep(self.config.retention.sweep_interval_s)

    async def sweep(self) -> dict[str, int]:
        """One retention pass now (operators, tests); returns how many jobs it swept."""
        counts = await asyncio.to_thread(self.sweeper.sweep)
        return {"inputs": counts.inputs, "outputs": counts.outputs}

    async def _track_capacity(self) -> None:
        """Slots of each pool = its RUNNING replicas x their concurrency. A replica that cannot be placed (no
        node has the GPUs its placement group needs) is not RUNNING: its pool's jobs wait in the queue."""
        from ray import serve

        app = serve.get_replica_context().app_name
        fixed = {"denoiser"} if self.config.max_inflight_jobs is not None else set()
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                application = status.applications.get(app)
                for pool, cfg in self._pool_configs.items():
                    if pool in fixed or application is None:
                        continue
                    deployment = application.deployments.get(denoiser_deployment_name(pool))
                    if deployment is not None:  # absent while the app is still being deployed
                        running = deployment.replica_states.get("RUNNING", 0)
                        self.dispatcher.set_capacity(running * cfg.max_ongoing_requests, pool)
            except Exception:  # status is advisory: keep the last capacity on a hiccup
                logger.exception("could not read the replica counts")
            await asyncio.sleep(1.0)

    async def nudge(self) -> None:
        self.dispatcher.nudge()

    async def running(self) -> list[str]:
        return self.dispatcher.running_ids

    async def capacities(self) -> dict[str, int]:
        return dict(self.dispatcher.capacities)

    async def check_health(self) -> None:
        if self._loop_task.done():
            raise RuntimeError(f"dispatch loop stopped: {self._loop_task.exception()!r}")

    async def run_job(self, job: JobRecord, release_slot: Callable[[], None]) -> None:
        from imagine.editing.grounding import GroundingError

        store = self.store
        try:
            if job.kind == "edit":
                await self._run_edit(job, release_slot)
            else:
                await self._run_generation(job, release_slot)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any stage failure fails this job, not the scheduler
            if caused_by(e, replica_lost_errors()):
                # a stage replica (or a rank of a parallel one, or its node) died under the job: Serve replaces
                # it; the job runs again (from its last checkpoint, if it has one) while it has attempts left
                if await asyncio.to_thread(store.retry, job.id, job.attempt, self.config.scheduling.max_attempts):
                    logger.warning("job %s attempt %d lost its replica; re-queued: %r", job.id, job.attempt, e)
                    self.dispatcher.nudge()
                    return
            logger.exception("job %s failed", job.id)
            code = "edit_failed" if job.kind == "edit" else "generation_failed"
            if caused_by(e, GroundingError):
                code = "target_not_found"
            if await asyncio.to_thread(store.fail, job.id, job.attempt, _error(code, e, job.id)):
                await self._ended(job)  # a failed job never resumes: its inputs, checkpoint and work files go

    def _pool(self, job: JobRecord) -> Any:
        denoiser = self.denoisers.get(job.pool)
        if denoiser is None:
            raise RuntimeError(f"job {job.id} needs denoiser pool {job.pool!r}, which this app does not deploy")
        return denoiser

    async def _sample(
        self,
        job: JobRecord,
        request: Any,
        conditioning: Any,
        release_slot: Callable[[], None],
        output: Callable[[Any], Awaitable[dict[str, Any]]],
    ) -> None:
        """The part every job kind shares: sample on the job's pool, free the slot, then finish by outcome:
        cancelled; preempted (re-queued with its checkpoint); or done -> `output(sampled)` -> complete + bill."""
        outcome: SampleOutcome = await self._pool(job).denoise.remote(job, request, conditioning)
        release_slot()  # the pool is free: the next job may start while this one decodes
        if outcome.status == "cancelled":
            if await asyncio.to_thread(self.store.mark_cancelled, job.id, job.attempt):
                await self._ended(job)
            return
        if outcome.status == "preempted":
            await asyncio.to_thread(self.store.requeue_preempted, job.id, job.attempt, outcome.checkpoint_key)
            self.dispatcher.nudge()
            return
        result = await output(outcome.output)
        result["stage_seconds"]["denoise"] = outcome.seconds
        retain_s = self.config.retention.outputs_ttl_s
        if not await asyncio.to_thread(self.store.complete, job.id, job.attempt, result, retain_s):
            logger.info("job %s attempt %d finished but is no longer current; result dropped", job.id, job.attempt)
            return
        await asyncio.to_thread(self.ledger.bill, job, result["duration_s"])
        await self._ended(job)

    async def _ended(self, job: JobRecord) -> None:
        """The job just ended here: its inputs, checkpoint and work files go now (the periodic sweep would find them
        too, and does for jobs ended elsewhere: cancelled while queued, expired)."""
        try:
            await asyncio.to_thread(self.sweeper.sweep_job, job.id)
        except Exception:  # the periodic sweep retries
            logger.exception("could not delete the scratch files of job %s", job.id)

    async def _run_generation(self, job: JobRecord, release_slot: Callable[[], None]) -> None:
        spec = await asyncio.to_thread(spec_from_job, job, self.artifacts)
        # not awaited: Serve resolves it in the denoiser, so the embeddings never pass through here
        embeddings = self.encoder.encode.remote(job, spec.prompt, spec.negative_prompt, spec.do_classifier_free_guidance)

        async def decode(latents: Any) -> dict[str, Any]:
            return await self.decoder.decode.remote(job, latents, output_video_key(job.tenant, job.id))

        await self._sample(job, spec, embeddings, release_slot, decode)

    async def _run_edit(self, job: JobRecord, release_slot: Callable[[], None]) -> None:
        """Grounding (unless the request gave a mask, or an earlier attempt stored the masks) -> conditioning ->
        the `editor` pool's sampler -> decode + composite + mux."""
        if self.edit_codec is None:
            raise RuntimeError("this app does not deploy the edit path")
        spec = edit_spec_from_job(job)
        grounding_s = 0.0
        if needs_grounding(job):
            if not await asyncio.to_thread(has_grounded_masks, self.artifacts, job):  # a resumed job has them
                if self.grounder is None:
                    raise RuntimeError("this app does not deploy the grounder")
                grounding_s = await self.grounder.ground.remote(job)
        conditioning = self.edit_codec.encode.remote(job, spec)  # resolved in the editor pool's replica

        async def decode(sampled: Any) -> dict[str, Any]:
            result = await self.edit_codec.decode.remote(job, sampled, output_video_key(job.tenant, job.id))
            result["stage_seconds"]["grounding"] = grounding_s
            return result

        await self._sample(job, spec, conditioning, release_slot, decode)
