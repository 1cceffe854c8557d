"""What the routes do, without HTTP: turn a request of any job kind into a stored, admitted job (`create`), and read,
cancel and serve jobs back. Each kind supplies only its params builder and its inputs; headers and Range parsing
live in `api.http`, data URIs in `api.intake`, quotas in `scheduling.admission`, the key layout in `storage.keys`."""

from __future__ import annotations

import datetime
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from imagine.api.dialects import XAI_STATUS
from imagine.api.errors import ApiError, rate_limited
from imagine.api.intake import decode_image, decode_video
from imagine.api.principal import Principal, local_principal
from imagine.api.schemas import (
    EditRequest,
    ErrorInfo,
    GenerationRequest,
    JobResponse,
    ModelInfo,
    Usage,
    VideoInfo,
)
from imagine.config import EDIT_POOL, AppConfig
from imagine.jobs import (
    EditParams,
    GenerationParams,
    JobKind,
    JobNotFound,
    JobParams,
    JobRecord,
    JobStateConflict,
    JobStatus,
    JobStore,
    NewJob,
    new_job_id,
)
from imagine.jobs.idempotency import IdempotencyKeyInUse, IdempotencyStore, body_fingerprint
from imagine.jobs.keys import KeyStore
from imagine.jobs.ledger import Ledger
from imagine.jobs.store import DEFAULT_POOL
from imagine.pipeline.sizing import plan_video
from imagine.scheduling.admission import check_admission
from imagine.storage import ArtifactNotFound, ArtifactStore, input_image_key, input_mask_key, input_source_key

if TYPE_CHECKING:  # `imagine.models` loads torch (its package imports the weight loaders): a type only, here
    from imagine.models.presets import ModelPreset

CreateRequest = GenerationRequest | EditRequest  # a create body of any kind

# artifact keys in the params are ours, not the client's: `GET /v1/videos/{id}` leaves them out of `request`
_INTERNAL_PARAMS = {"image_key", "source_key", "mask_key"}


@dataclass(frozen=True)
class CreateOptions:
    """What a create request says besides its body (its headers)."""

    priority: str = "standard"  # requested; capped at the caller's tier
    idempotency_key: str | None = None
    start_deadline_s: float | None = None  # expire the job if it has not started this many seconds after creation


@dataclass(frozen=True)
class Created:
    job: JobRecord
    replayed: bool  # True: an Idempotency-Key duplicate, `job` is the one the first request created


@dataclass(frozen=True)
class JobDraft:
    """A validated request of one kind, as its builder makes it: the job's model, params and pool, and the inputs to
    store (artifact key -> bytes) before the job is inserted (deleted again when it is not)."""

    model: str
    params: JobParams
    pool: str = DEFAULT_POOL
    inputs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredVideo:
    """A done job's video in the artifact store."""

    key: str
    size: int


def _seed(requested: int | None) -> int:
    """The request's seed, or a random one (reported back in the job's `request`)."""
    return requested if requested is not None else random.SystemRandom().randrange(0, 2**32)


class JobService:
    """The API's behaviour over a job store, an artifact store and the served model presets."""

    def __init__(
        self,
        config: AppConfig,
        store: JobStore,
        artifacts: ArtifactStore,
        presets: dict[str, ModelPreset],
        default_model: str,
        notify: Callable[[], None] | None = None,
        keys: KeyStore | None = None,
        idempotency: IdempotencyStore | None = None,
        edit_presets: dict[str, ModelPreset] | None = None,
        router: Callable[[GenerationParams], str] | None = None,
    ):
        if default_model not in presets:
            raise ValueError(f"default_model {default_model!r} is not among the served presets {sorted(presets)}")
        self.config = config
        self.store = store
        self.artifacts = artifacts
        self.ledger = Ledger(store.engine, config.accounting)
        self.presets = presets
        self.default_model = default_model
        self.notify = notify or (lambda: None)
        self.keys = keys or KeyStore(store.engine)
        self.idempotency = idempotency or IdempotencyStore(store.engine, config.auth.idempotency_ttl_s)
        # edits are served when the app serves an edit model (None: POST /v1/videos/edits answers 404)
        self.edit_presets = edit_presets
        self.default_edit_model = next(iter(edit_presets)) if edit_presets else None
        # generation params -> denoiser pool (None: every job to the default `denoiser` pool); raises
        # `imagine.parallel.routing.NoFittingDenoiser` for a clip no pool can take
        self.router = router
        # each job kind: its request body and its builder (validate the body, make the params, name the inputs)
        self._kinds: dict[str, tuple[type[BaseModel], Callable[[Any, Principal, str], JobDraft]]] = {
            "generation": (GenerationRequest, self._build_generation),
            "edit": (EditRequest, self._build_edit),
        }

    # -- models ----------------------------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(
                id=name,
                family=p.family,
                description=p.description,
                default=name == self.default_model,
                max_duration=p.max_duration_s,
                default_fps=p.default_fps,
                default_steps=p.default_steps,
            )
            for name, p in self.presets.items()
        ]

    # -- create ----------------------------------------------------------------------------
    def create(
        self,
        kind: JobKind,
        request: CreateRequest,
        principal: Principal | None = None,
        options: CreateOptions | None = None,
        dialect: str = "imagine",
    ) -> Created:
        """Every kind's create: Idempotency-Key replay -> validate -> build params -> store inputs -> admit + insert
        (one transaction) -> nudge the scheduler. An Idempotency-Key duplicate returns the first request's job."""
        if kind not in self._kinds:
            raise ValueError(f"unknown job kind {kind!r}; known: {sorted(self._kinds)}")
        request_type, build = self._kinds[kind]
        if not isinstance(request, request_type):
            raise TypeError(f"a {kind!r} job is created from a {request_type.__name__}, got {type(request).__name__}")
        principal = principal or local_principal(self.config.auth)
        options = options or CreateOptions()
        body_hash = None
        if options.idempotency_key is not None:
            body_hash = body_fingerprint(request.model_dump(mode="json", exclude_unset=True))
            replay = self._replay(principal, options.idempotency_key, body_hash, time.time())
            if replay is not None:
                return replay
        self._check_prompts(request.prompt, request.negative_prompt)
        job_id = new_job_id()
        draft = build(request, principal, job_id)

        now = time.time()
        job = NewJob(
            kind=kind, model=draft.model, params=draft.params, tenant=principal.tenant,
            priority=principal.cap_priority(options.priority), id=job_id, api_key_id=principal.key_id,
            deadline_at=now + options.start_deadline_s if options.start_deadline_s is not None else None,
            pool=draft.pool, dialect=dialect,
        )
        stored: list[str] = []
        try:
            for key, data in draft.inputs.items():
                self.artifacts.put_bytes(key, data)
                stored.append(key)
            created = self._insert(job, principal, options, body_hash, now)
        except Exception:
            self._discard(stored)  # a refused job leaves no inputs behind
            raise
        if created.replayed:
            self._discard(stored)
        else:
            self.notify()
        return created

    def _check_prompts(self, prompt: str, negative_prompt: str | None) -> None:
        limit = self.config.limits.max_prompt_chars
        if len(prompt) > limit:
            raise ApiError(422, "prompt_too_long", f"prompt has {len(prompt)} characters, over {limit}", "prompt")
        if negative_prompt is not None and len(negative_prompt) > limit:
            raise ApiError(
                422, "prompt_too_long", f"negative_prompt has {len(negative_prompt)} characters, over {limit}",
                "negative_prompt",
            )

    def _build_generation(self, req: GenerationRequest, principal: Principal, job_id: str) -> JobDraft:
        """Text (+ first frame) -> video: the model's limits, model-legal sizes, the image as PNG, the pool."""
        name = self._model_name(req.model, self.default_model)
        if req.reference_images is not None:
            raise ApiError(
                422, "unsupported_parameter", f"reference_images are not supported by model {name!r}: give the first "
                "frame as image (or image_url), or describe the subject in the prompt", "reference_images",
            )
        if name not in self.presets:
            raise ApiError(
                400, "model_not_found", f"model {name!r} is not served here; available: {sorted(self.presets)}", "model"
            )
        preset = self.presets[name]
        if req.duration > preset.max_duration_s:
            raise ApiError(422, "invalid_parameter", f"duration {req.duration} is over {name}'s {preset.max_duration_s} s", "duration")
        plan = plan_video(req.duration, req.resolution, req.aspect_ratio, req.fps or preset.default_fps)
        frame = req.first_frame
        image_png = (
            decode_image(frame[0], frame[1], self.config.limits, self.config.remote_media) if frame is not None else None
        )
        params = GenerationParams(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or "",
            duration=req.duration,
            resolution=req.resolution,
            aspect_ratio=req.aspect_ratio,
            seed=_seed(req.seed),
            num_inference_steps=req.num_inference_steps or preset.default_steps,
            guidance_scale=req.guidance_scale if req.guidance_scale is not None else preset.default_guidance_scale,
            fps=plan.fps,
            width=plan.width,
            height=plan.height,
            num_frames=plan.num_frames,
            image_key=input_image_key(principal.tenant, job_id) if image_png is not None else None,
        )
        inputs = {params.image_key: image_png} if params.image_key is not None else {}
        return JobDraft(name, params, self._route(params), inputs)

    def _model_name(self, requested: str | None, default: str | None) -> str | None:
        """The preset a request's `model` names: itself, or what `model_aliases` maps it to (an alias to "default" is
        the server's default model of the route), or the default when none is given."""
        if requested is None:
            return default
        target = self.config.model_aliases.get(requested, requested)
        return default if target == "default" else target

    def _route(self, params: GenerationParams) -> str:
        if self.router is None:
            return DEFAULT_POOL
        from imagine.parallel.routing import NoFittingDenoiser  # torch-free; imported where a router is configured

        try:
            return self.router(params)
        except NoFittingDenoiser as e:
            raise ApiError(413, "clip_too_large", str(e), "duration") from e

    def _build_edit(self, req: EditRequest, principal: Principal, job_id: str) -> JobDraft:
        """An instruction (or mask) on a source clip: the source (a done job of the caller, or an upload), its limits,
        the mask and the instruction; the output keeps the source's size, frames, rate and audio."""
        if self.edit_presets is None:
            raise ApiError(404, "edits_disabled", "video edits are not enabled on this server", "prompt")
        from imagine.api import edits  # PyAV: loaded on the first edit, not when the ingress starts

        source = req.source_url
        if (req.video_id is None) == (source is None):
            raise ApiError(422, "invalid_parameter", "give exactly one of video_id (a done job) or video_url / video "
                           "(a URL or data URI)", "video_id")
        name = self._model_name(req.model, self.default_edit_model)
        if name not in self.edit_presets:
            raise ApiError(400, "model_not_found", f"edit model {name!r} is not served here; available: {sorted(self.edit_presets)}", "model")
        cfg = self.config.edit
        instruction = edits.edit_instruction(req)

        inputs: dict[str, bytes] = {}
        if req.video_id is not None:
            source_job = self.get(req.video_id, principal.tenant, param="video_id")
            if source_job.status != JobStatus.DONE or not source_job.result:
                raise ApiError(409, "video_not_ready", f"job {req.video_id} is {source_job.status.value}; only done videos can be edited", "video_id")
            self._check_not_expired(source_job, "video_id")
            r = source_job.result
            info = edits.SourceInfo(r["width"], r["height"], r["num_frames"], r["fps"], r["num_frames"] / r["fps"], r.get("has_audio", True))
            source_key, source_field = r["artifact_key"], "video_id"
        else:
            url, source_field = source
            uploaded = decode_video(url, source_field, cfg.max_source_bytes, self.config.remote_media)
            info = edits.probe_video(uploaded, source_field, max_frames=edits.max_source_frames(cfg),
                                     max_pixels=cfg.max_source_pixels)
            source_key = input_source_key(principal.tenant, job_id)
            inputs[source_key] = uploaded
        edits.check_source_limits(info, source_field, cfg)
        mask, mask_video = (
            edits.check_mask(req.mask, info, cfg.max_source_bytes, cfg.max_mask_boxes, self.config.remote_media)
            if req.mask else (None, None)
        )
        mask_key = None
        if mask_video is not None:
            mask_key = input_mask_key(principal.tenant, job_id)
            inputs[mask_key] = mask_video

        params = EditParams(
            prompt=req.prompt,
            instruction=instruction,
            negative_prompt=req.negative_prompt or "",
            seed=_seed(req.seed),
            num_inference_steps=req.num_inference_steps or cfg.default_steps,
            guidance_scale=req.guidance_scale if req.guidance_scale is not None else cfg.guidance_scale,
            source_job_id=req.video_id,
            source_key=source_key,
            width=info.width,
            height=info.height,
            num_frames=info.num_frames,
            fps=info.fps,
            duration=info.duration_s,
            resolution=info.resolution,
            source_has_audio=info.has_audio,
            mask=mask,
            mask_key=mask_key,
        )
        return JobDraft(name, params, EDIT_POOL, inputs)

    def _insert(
        self, job: NewJob, principal: Principal, options: CreateOptions, body_hash: str | None, now: float
    ) -> Created:
        """Insert `job` with its Idempotency-Key and admission checks in ONE transaction (all or nothing: a
        rejected request leaves no row); a concurrent duplicate that committed first is answered as a replay."""
        try:
            with self.store.write_guard(), self.store.engine.begin() as conn:
                self.store.lock_for_admission(conn)
                if options.idempotency_key is not None:
                    self.idempotency.reserve(conn, principal.tenant, options.idempotency_key, body_hash, job.id, now)
                self.store.insert(conn, job, now)
                rejection = check_admission(
                    self.store, conn, job, principal.limits, self.config.scheduling.max_queued_per_tier, now
                )
                if rejection is not None:  # raised inside the transaction: it rolls back
                    raise rate_limited(rejection.code, rejection.message, rejection.retry_after_s)
        except IdempotencyKeyInUse as e:
            # a concurrent duplicate committed first: answer with its job (it is live: it just committed)
            replay = self._replay(principal, options.idempotency_key, body_hash, time.time())
            if replay is None:
                raise ApiError(
                    409, "idempotency_conflict", "a request with this Idempotency-Key expired while this one ran; retry",
                    "Idempotency-Key",
                ) from e
            return replay
        return Created(self.store.get(job.id), replayed=False)

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            self.artifacts.delete(key)

    def _replay(self, principal: Principal, key: str, body_hash: str, now: float) -> Created | None:
        record = self.idempotency.get(principal.tenant, key, now)
        if record is None:
            return None
        if record.body_hash != body_hash:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was used with a different request body", "Idempotency-Key"
            )
        return Created(self.get(record.job_id, principal.tenant), replayed=True)

    # -- read / cancel -----------------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None, param: str = "id") -> JobRecord:
        """The job `job_id` of `tenant`; 404 naming `param` (the request field that gave the id) when there is none."""
        try:
            job = self.store.get(job_id, tenant)
        except JobNotFound as e:
            raise ApiError(404, "not_found", f"no video job with id {job_id!r}", param) from e
        if job.deleted_at is not None:
            raise ApiError(404, "not_found", f"no video job with id {job_id!r} (it was deleted)", param)
        return job

    def list_page(self, tenant: str, limit: int, after: str | None, order: str) -> tuple[list[JobRecord], bool]:
        """One page of the tenant's jobs, newest first by default (`after`: the last id of the previous page)."""
        try:
            return self.store.list_page(tenant, limit, after, order)
        except JobNotFound as e:
            raise ApiError(400, "invalid_cursor", f"after {after!r} is not a video of yours", "after") from e

    def delete(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Delete a job for its owner: a live one is cancelled first; it is gone from the API at once, its outputs
        are deleted now (a live one's inputs when it ends, by the sweeper); the row stays for the ledger."""
        job = self.get(job_id, tenant)
        if not job.status.terminal:
            try:
                self.store.request_cancel(job_id, tenant)
            except JobStateConflict:
                pass  # it ended meanwhile
        self.store.mark_deleted(job_id, time.time())
        from imagine.storage.retention import Sweeper

        sweeper = Sweeper(self.store, self.artifacts)
        sweeper.sweep_job(job_id)  # inputs, if it has ended
        sweeper.sweep_outputs(job_id)
        return job

    def cancel(self, job_id: str, tenant: str | None = None) -> JobRecord:
        self.get(job_id, tenant)
        try:
            return self.store.request_cancel(job_id, tenant)
        except JobStateConflict as e:
            raise ApiError(409, "job_finished", str(e), "id") from e

    def to_response(self, job: JobRecord, base_url: str) -> JobResponse:
        video = None
        if job.status == JobStatus.DONE and job.result:
            r = job.result
            url, expires_at = None, job.expires_at
            if not job.expired():
                ttl = self.config.s3.presigned_url_ttl_s
                if job.expires_at is not None:  # never sign past the video's own expiry
                    ttl = max(1, min(ttl, int(job.expires_at - time.time())))
                url = self.artifacts.presigned_url(r["artifact_key"], ttl)  # signed here: no request to the store
                if url is not None:
                    expires_at = time.time() + ttl
                else:
                    url = f"{(self.config.public_url or base_url).rstrip('/')}/v1/videos/{job.id}/content"
            video = VideoInfo(
                url=url, expires_at=expires_at,
                duration=r["duration_s"], width=r["width"], height=r["height"], fps=r["fps"], has_audio=r["has_audio"],
            )
        error = ErrorInfo(**job.error) if job.error else None
        request = job.params.model_dump(mode="json", exclude=_INTERNAL_PARAMS)
        if isinstance(job.params, GenerationParams):
            request["has_image"] = job.params.image_key is not None
        return JobResponse(
            id=job.id, request_id=job.id, kind=job.kind, model=job.model, priority=job.priority,
            status=XAI_STATUS[job.status], state=job.status.value,
            progress=round(job.progress, 4), created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, deadline_at=job.deadline_at, expires_at=job.expires_at, video=video, error=error, request=request,
            usage=Usage(**self.ledger.job_usage(job)),
        )

    @staticmethod
    def _check_not_expired(job: JobRecord, field: str) -> None:
        if job.expired():
            when = datetime.datetime.fromtimestamp(job.expires_at, datetime.UTC).isoformat(timespec="seconds")
            raise ApiError(
                410, "video_expired", f"the video of job {job.id} expired at {when} (retention) and was deleted; the "
                "job's record stays", field,
            )

    def content(self, job_id: str, tenant: str | None = None, variant: str = "video") -> StoredVideo:
        """A done job's stored video, or its `thumbnail` / `spritesheet` JPEG (409 before it is done, 410 once
        retention removed it, 404 for a still the job has none of)."""
        job = self.get(job_id, tenant)
        if job.status != JobStatus.DONE or not job.result:
            raise ApiError(409, "video_not_ready", f"job {job_id} is {job.status.value}; content exists once it is done", "id")
        self._check_not_expired(job, "id")
        if variant == "video":
            key = job.result["artifact_key"]
        else:
            key = (job.result.get("artifact_keys") or {}).get(variant)
            if key is None:
                raise ApiError(404, "variant_not_found", f"job {job_id} has no {variant} (made before stills were)",
                               "variant")
        try:
            return StoredVideo(key, self.artifacts.size(key))
        except ArtifactNotFound as e:
            raise ApiError(410, "content_gone", f"the video of job {job_id} is no longer stored", "id") from e
