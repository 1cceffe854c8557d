"""What the routes do, without HTTP: validate a request against the server's limits and model,
store its inputs, insert the job, nudge the scheduler; read, cancel and stream jobs back."""

from __future__ import annotations

import base64
import binascii
import io
import math
import random
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import sqlalchemy as sa
from PIL import Image, UnidentifiedImageError

from imagine.api.auth import Principal, local_principal
from imagine.api.errors import ApiError, rate_limited
from imagine.api.schemas import (
    EditRequest,
    ErrorInfo,
    GenerationRequest,
    JobResponse,
    ModelInfo,
    Usage,
    VideoInfo,
)
from imagine.config import TIERS, AppConfig
from imagine.jobs import (
    JobNotFound,
    JobRecord,
    JobStateConflict,
    JobStatus,
    JobStore,
    NewJob,
)
from imagine.jobs.idempotency import MAX_KEY_CHARS, IdempotencyKeyInUse, IdempotencyStore, body_fingerprint
from imagine.jobs.keys import KeyStore
from imagine.jobs.ledger import Ledger
from imagine.models.presets import ModelPreset
from imagine.pipeline.sizing import plan_video
from imagine.storage import ArtifactNotFound, ArtifactStore

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)
_ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "GIF", "BMP"}
_DAY_S = 86_400
# Retry-After of a full queue or a key at its concurrency: about one short job's time; no better estimate yet
BUSY_RETRY_AFTER_S = 10


def input_image_key(job_id: str) -> str:
    return f"inputs/{job_id}/image.png"


def input_source_key(job_id: str) -> str:
    return f"inputs/{job_id}/source.mp4"


def input_mask_key(job_id: str) -> str:
    return f"inputs/{job_id}/mask.mp4"


def output_video_key(job_id: str) -> str:
    return f"outputs/{job_id}/video.mp4"


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


def parse_priority(value: str | None) -> str:
    """The `X-Priority` header: realtime | standard | batch (default standard)."""
    if value is None:
        return "standard"
    if value.strip().lower() not in TIERS:
        raise ApiError(400, "invalid_priority", f"X-Priority must be one of {', '.join(TIERS)}, got {value!r}", "X-Priority")
    return value.strip().lower()


def parse_start_deadline(value: str | None) -> float | None:
    """The `X-Start-Deadline` header: a positive number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError as e:
        raise ApiError(400, "invalid_start_deadline", f"X-Start-Deadline must be a number of seconds, got {value!r}", "X-Start-Deadline") from e
    if not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(400, "invalid_start_deadline", f"X-Start-Deadline must be > 0 seconds, got {value!r}", "X-Start-Deadline")
    return seconds


def parse_idempotency_key(value: str | None) -> str | None:
    """The `Idempotency-Key` header: 1-255 visible characters."""
    if value is None:
        return None
    if not value or len(value) > MAX_KEY_CHARS or not value.isprintable():
        raise ApiError(400, "invalid_idempotency_key", f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable characters", "Idempotency-Key")
    return value


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive
    size: int
    partial: bool


def parse_range(header: str | None, size: int) -> ByteRange:
    """One `bytes=` range per RFC 9110; a malformed header is ignored (full body), an unsatisfiable one is 416."""
    full = ByteRange(0, size - 1, size, False)
    if not header:
        return full
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None or (not match.group(1) and not match.group(2)):
        return full  # multi-range or garbage: serving the whole body is allowed
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
        if last and int(last) < start:
            return full
    else:  # suffix range: the last N bytes
        n = int(last)
        if n == 0:
            raise ApiError(416, "range_not_satisfiable", "empty suffix range", "Range", headers={"Content-Range": f"bytes */{size}"})
        start, end = max(0, size - n), size - 1
    if start >= size:
        raise ApiError(
            416, "range_not_satisfiable", f"range starts at {start} but the file has {size} bytes", "Range",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return ByteRange(start, end, size, True)


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
        router: Callable[[dict], str] | None = None,
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
        # generation params -> denoiser pool (None: every job to the default `denoiser` pool)
        self.router = router

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
    def _decode_image(self, image_url: str) -> bytes:
        """A data URI -> normalised PNG bytes; every failure names `image_url`."""
        limits = self.config.limits
        if not image_url.startswith("data:"):
            raise ApiError(
                400, "unsupported_image_url",
                "image_url must be a data URI (data:image/png;base64,...); remote URLs are not fetched yet",
                "image_url",
            )
        match = _DATA_URI.match(image_url)
        if match is None or not match.group("b64"):
            raise ApiError(400, "invalid_image_url", "image_url is not a base64 data URI", "image_url")
        if match.group("mime") and not match.group("mime").startswith("image/"):
            raise ApiError(400, "invalid_image_url", f"image_url has media type {match.group('mime')!r}, not image/*", "image_url")
        payload = match.group("data")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ApiError(413, "image_too_large", f"image_url is larger than {limits.max_image_bytes} bytes", "image_url")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, "invalid_image_url", f"image_url has invalid base64: {e}", "image_url") from e
        try:
            with Image.open(io.BytesIO(raw)) as probe:
                fmt = probe.format
                w, h = probe.size
                if w * h > limits.max_image_pixels:
                    raise ApiError(413, "image_too_large", f"image is {w}x{h}, over {limits.max_image_pixels} pixels", "image_url")
                probe.verify()
            with Image.open(io.BytesIO(raw)) as img:
                rgb = img.convert("RGB")
        except ApiError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ApiError(400, "invalid_image", f"image_url could not be decoded as an image: {e}", "image_url") from e
        if fmt not in _ALLOWED_IMAGE_FORMATS:
            raise ApiError(400, "invalid_image", f"image format {fmt} is not supported", "image_url")
        out = io.BytesIO()
        rgb.save(out, format="PNG")
        return out.getvalue()

    def _resolve_model(self, requested: str | None) -> tuple[str, ModelPreset]:
        name = requested or self.default_model
        if name not in self.presets:
            raise ApiError(
                400, "model_not_found", f"model {name!r} is not served here; available: {sorted(self.presets)}", "model"
            )
        return name, self.presets[name]

    def create_generation(
        self, req: GenerationRequest, principal: Principal | None = None, options: CreateOptions | None = None
    ) -> Created:
        """Validate, admit and insert a job; an Idempotency-Key duplicate returns the first request's job."""
        principal = principal or local_principal(self.config.auth)
        options = options or CreateOptions()
        body_hash = None
        if options.idempotency_key is not None:
            body_hash = body_fingerprint(req.model_dump(mode="json", exclude_unset=True))
            replay = self._replay(principal, options.idempotency_key, body_hash, time.time())
            if replay is not None:
                return replay
        limits = self.config.limits
        if len(req.prompt) > limits.max_prompt_chars:
            raise ApiError(422, "prompt_too_long", f"prompt has {len(req.prompt)} characters, over {limits.max_prompt_chars}", "prompt")
        if req.negative_prompt is not None and len(req.negative_prompt) > limits.max_prompt_chars:
            raise ApiError(422, "prompt_too_long", f"negative_prompt is over {limits.max_prompt_chars} characters", "negative_prompt")
        model_name, preset = self._resolve_model(req.model)
        if req.duration > preset.max_duration_s:
            raise ApiError(422, "invalid_parameter", f"duration {req.duration} is over {model_name}'s {preset.max_duration_s} s", "duration")
        fps = req.fps or preset.default_fps
        plan = plan_video(req.duration, req.resolution, req.aspect_ratio, fps)
        image_png = self._decode_image(req.image_url) if req.image_url is not None else None

        now = time.time()
        job = NewJob(
            kind="generation", model=model_name, params={}, tenant=principal.tenant,
            priority=principal.cap_priority(options.priority), api_key_id=principal.key_id,
            deadline_at=now + options.start_deadline_s if options.start_deadline_s is not None else None,
        )
        params = {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt or "",
            "duration": req.duration,
            "resolution": req.resolution,
            "aspect_ratio": req.aspect_ratio,
            "seed": req.seed if req.seed is not None else random.SystemRandom().randrange(0, 2**32),
            "num_inference_steps": req.num_inference_steps or preset.default_steps,
            "guidance_scale": req.guidance_scale if req.guidance_scale is not None else preset.default_guidance_scale,
            "fps": plan.fps,
            "width": plan.width,
            "height": plan.height,
            "num_frames": plan.num_frames,
            "image_key": None,
        }
        if self.router is not None:
            from imagine.parallel.routing import NoFittingDenoiser

            try:
                job.pool = self.router(params)
            except NoFittingDenoiser as e:
                raise ApiError(413, "clip_too_large", str(e), "duration") from e
        if image_png is not None:
            params["image_key"] = input_image_key(job.id)
            self.artifacts.put_bytes(params["image_key"], image_png)
        job.params = params
        return self._insert(job, principal, options, body_hash, now, lambda: self._discard_inputs(params))

    def _insert(
        self,
        job: NewJob,
        principal: Principal,
        options: CreateOptions,
        body_hash: str | None,
        now: float,
        discard: Callable[[], None],
    ) -> Created:
        """Insert `job` with its Idempotency-Key and admission checks in ONE transaction (all or nothing: a
        rejected request leaves no row; `discard` removes the inputs it stored)."""
        try:
            with self.store.write_guard(), self.store.engine.begin() as conn:
                self.store.lock_for_admission(conn)
                if options.idempotency_key is not None:
                    self.idempotency.reserve(conn, principal.tenant, options.idempotency_key, body_hash, job.id, now)
                self.store.insert(conn, job, now)
                self._admit(conn, principal, job, now)
        except ApiError:
            discard()
            raise
        except IdempotencyKeyInUse as e:
            discard()
            # a concurrent duplicate committed first: answer with its job (it is live: it just committed)
            replay = self._replay(principal, options.idempotency_key, body_hash, time.time())
            if replay is None:
                raise ApiError(
                    409, "idempotency_conflict", "a request with this Idempotency-Key expired while this one ran; retry",
                    "Idempotency-Key",
                ) from e
            return replay
        self.notify()
        return Created(self.store.get(job.id), replayed=False)

    # -- edits -----------------------------------------------------------------------------
    def create_edit(
        self, req: EditRequest, principal: Principal | None = None, options: CreateOptions | None = None
    ) -> Created:
        """Validate the source, mask and instruction; store the inputs; insert an `edit` job (pool `editor`)."""
        from imagine.api import edits

        if self.edit_presets is None:
            raise ApiError(404, "edits_disabled", "video edits are not enabled on this server", "prompt")
        principal = principal or local_principal(self.config.auth)
        options = options or CreateOptions()
        body_hash = None
        if options.idempotency_key is not None:
            body_hash = body_fingerprint(req.model_dump(mode="json", exclude_unset=True))
            replay = self._replay(principal, options.idempotency_key, body_hash, time.time())
            if replay is not None:
                return replay
        cfg = self.config.edit
        if len(req.prompt) > self.config.limits.max_prompt_chars:
            raise ApiError(422, "prompt_too_long", f"prompt is over {self.config.limits.max_prompt_chars} characters", "prompt")
        if req.negative_prompt is not None and len(req.negative_prompt) > self.config.limits.max_prompt_chars:
            raise ApiError(422, "prompt_too_long", f"negative_prompt is over {self.config.limits.max_prompt_chars} characters", "negative_prompt")
        if (req.video_id is None) == (req.video_url is None):
            raise ApiError(422, "invalid_parameter", "give exactly one of video_id (a done job) or video_url (a data URI)", "video_id")
        name = req.model or self.default_edit_model
        if name not in self.edit_presets:
            raise ApiError(400, "model_not_found", f"edit model {name!r} is not served here; available: {sorted(self.edit_presets)}", "model")
        preset = self.edit_presets[name]
        instruction = edits.instruction_params(req)

        uploaded: bytes | None = None
        if req.video_id is not None:
            source_job = self.get(req.video_id, principal.tenant)
            if source_job.status != JobStatus.DONE or not source_job.result:
                raise ApiError(409, "video_not_ready", f"job {req.video_id} is {source_job.status.value}; only done videos can be edited", "video_id")
            r = source_job.result
            info = edits.SourceInfo(r["width"], r["height"], r["num_frames"], r["fps"], r["num_frames"] / r["fps"], r.get("has_audio", True))
            field = "video_id"
        else:
            uploaded = edits.decode_video_data_uri(req.video_url, "video_url", cfg.max_source_bytes)
            info = edits.probe_video(uploaded, "video_url")
            field = "video_url"
        edits.check_source_limits(info, field, cfg)
        mask_params, mask_video = edits.check_mask(req.mask, info, cfg.max_source_bytes) if req.mask else (None, None)

        now = time.time()
        job = NewJob(
            kind="edit", model=name, params={}, tenant=principal.tenant, pool="editor",
            priority=principal.cap_priority(options.priority), api_key_id=principal.key_id,
            deadline_at=now + options.start_deadline_s if options.start_deadline_s is not None else None,
        )
        params = {
            "prompt": req.prompt,
            "instruction": instruction,
            "negative_prompt": req.negative_prompt or "",
            "seed": req.seed if req.seed is not None else random.SystemRandom().randrange(0, 2**32),
            "num_inference_steps": req.num_inference_steps or cfg.default_steps,
            "guidance_scale": req.guidance_scale if req.guidance_scale is not None else cfg.guidance_scale,
            "source_job_id": req.video_id,
            "source_key": source_job.result["artifact_key"] if req.video_id is not None else input_source_key(job.id),
            "width": info.width,
            "height": info.height,
            "num_frames": info.num_frames,
            "fps": info.fps,
            "duration": info.duration_s,
            "resolution": info.resolution,
            "source_has_audio": info.has_audio,
            "mask": mask_params,
            "mask_key": input_mask_key(job.id) if mask_video is not None else None,
            "image_key": None,
        }
        del preset  # one family today (wan_vace); the editor replica loads it
        stored = []
        if uploaded is not None:
            self.artifacts.put_bytes(params["source_key"], uploaded)
            stored.append(params["source_key"])
        if mask_video is not None:
            self.artifacts.put_bytes(params["mask_key"], mask_video)
            stored.append(params["mask_key"])
        job.params = params

        def discard() -> None:
            for key in stored:
                self.artifacts.delete(key)

        return self._insert(job, principal, options, body_hash, now, discard)

    def _discard_inputs(self, params: dict) -> None:
        if params["image_key"] is not None:
            self.artifacts.delete(params["image_key"])

    def _replay(self, principal: Principal, key: str, body_hash: str, now: float) -> Created | None:
        record = self.idempotency.get(principal.tenant, key, now)
        if record is None:
            return None
        if record.body_hash != body_hash:
            raise ApiError(
                422, "idempotency_key_reused", "this Idempotency-Key was used with a different request body", "Idempotency-Key"
            )
        return Created(self.get(record.job_id, principal.tenant), replayed=True)

    def _admit(self, conn: sa.Connection, principal: Principal, job: NewJob, now: float) -> None:
        """Admission and backpressure, inside the creating transaction after the job's insert (so
        concurrent creates are counted in turn); raises 429 + Retry-After naming the limit."""
        limits = principal.limits
        if limits.max_concurrent_jobs is not None or limits.max_queued_jobs is not None:
            active = self.store.count_active(conn, principal.tenant, principal.key_id, job.id)
            running, queued = active[JobStatus.RUNNING.value], active[JobStatus.QUEUED.value]
            # concurrent = in flight (queued or running): a key at its limit waits for one to finish
            if limits.max_concurrent_jobs is not None and running + queued >= limits.max_concurrent_jobs:
                raise rate_limited(
                    "concurrency_limit",
                    f"{running + queued} jobs of this key are queued or running; its limit is {limits.max_concurrent_jobs}",
                    BUSY_RETRY_AFTER_S,
                )
            if limits.max_queued_jobs is not None and queued >= limits.max_queued_jobs:
                raise rate_limited(
                    "queue_limit", f"{queued} jobs of this key are queued; its limit is {limits.max_queued_jobs}",
                    BUSY_RETRY_AFTER_S,
                )
        if limits.max_video_seconds_per_day is not None:
            day_start = now - now % _DAY_S  # UTC midnight (the epoch is one)
            used = self.store.requested_seconds_since(conn, principal.tenant, principal.key_id, day_start, job.id)
            requested = float(job.params["duration"])
            if used + requested > limits.max_video_seconds_per_day:
                raise rate_limited(
                    "daily_video_seconds_limit",
                    f"{used:g} s requested today + {requested:g} s is over this key's {limits.max_video_seconds_per_day:g} s per UTC day",
                    day_start + _DAY_S - now,
                )
        bound = self.config.scheduling.max_queued_per_tier.get(job.priority)
        if bound is not None and self.store.count_queued_in_tier(conn, job.priority, job.id) >= bound:
            raise rate_limited("tier_queue_full", f"the {job.priority} queue is full ({bound} jobs)", BUSY_RETRY_AFTER_S)

    # -- read / cancel -----------------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        try:
            return self.store.get(job_id, tenant)
        except JobNotFound as e:
            raise ApiError(404, "not_found", f"no video job with id {job_id!r}", "id") from e

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
            video = VideoInfo(
                url=f"{(self.config.public_url or base_url).rstrip('/')}/v1/videos/{job.id}/content",
                duration=r["duration_s"], width=r["width"], height=r["height"], fps=r["fps"], has_audio=r.get("has_audio", True),
            )
        error = ErrorInfo(**job.error) if job.error else None
        internal = ("image_key", "source_key", "mask_key")  # artifact keys are ours, not the client's
        request = {k: v for k, v in job.params.items() if k not in internal}
        if job.kind == "generation":
            request["has_image"] = bool(job.params.get("image_key"))
        return JobResponse(
            id=job.id, request_id=job.id, kind=job.kind, model=job.model, priority=job.priority, status=job.status.value,
            progress=round(job.progress, 4), created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, deadline_at=job.deadline_at, video=video, error=error, request=request,
            usage=Usage(**self.ledger.job_usage(job)),
        )

    def content(self, job_id: str, range_header: str | None, tenant: str | None = None) -> tuple[ByteRange, Iterator[bytes]]:
        job = self.get(job_id, tenant)
        if job.status != JobStatus.DONE or not job.result:
            raise ApiError(409, "video_not_ready", f"job {job_id} is {job.status.value}; content exists once it is done", "id")
        key = job.result["artifact_key"]
        try:
            size = self.artifacts.size(key)
        except ArtifactNotFound as e:
            raise ApiError(410, "content_gone", f"the video of job {job_id} is no longer stored", "id") from e
        rng = parse_range(range_header, size)
        return rng, self.artifacts.iter_range(key, rng.start, rng.end)
