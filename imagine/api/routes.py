"""The FastAPI app: thin routes over `JobService`. Runs inside the Serve ingress, or alone in tests.
Every /v1 route needs a principal (`imagine.api.auth`); every job route is scoped to its tenant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from imagine import __version__
from imagine.api.auth import principal_dependency
from imagine.api.dialects import (
    OpenAIVideo,
    OpenAIVideoList,
    Remix,
    VideoDeleted,
    nest_form,
    openai_generation_body,
    render_openai,
    upload_as_data_uri,
)
from imagine.api.errors import ERROR_RESPONSES, ApiError, install_error_handlers, rate_limited
from imagine.api.events import JobWatchers, PollPolicy, StreamSlots, job_state
from imagine.api.http import BodyLimitMiddleware, body_limits, create_options, parse_range
from imagine.api.ops import create_ops_router
from imagine.api.principal import Principal
from imagine.api.schemas import (
    CreatedResponse,
    EditRequest,
    GenerationRequest,
    JobResponse,
    ModelInfo,
)
from imagine.api.service import Created, CreateOptions, JobService
from imagine.jobs import JobRecord

_ERROR_RESPONSES = ERROR_RESPONSES
STREAM_RETRY_AFTER_S = 5.0  # Retry-After of a 429 for one event stream too many


class _SlotStream(EventSourceResponse):
    """An event stream that gives its key's stream slot back when it ends, however it ends (done, client gone,
    error, or a HEAD that never runs the stream)."""

    def __init__(self, content: AsyncIterator[ServerSentEvent], release: Callable[[], None], ping: int):
        super().__init__(content, ping=ping)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _accepted(created: Created, response: Response) -> CreatedResponse:
    if created.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return CreatedResponse(request_id=created.job.id)


MAX_FORM_FIELDS = 32  # a create's multipart body holds a handful of fields and at most one file
MAX_FORM_FILES = 2
STILL_TYPES = {"thumbnail": "image/jpeg", "spritesheet": "image/jpeg"}


def _body_schema(model: type[BaseModel], multipart: dict[str, Any] | None = None) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its own body: JSON of `model` (and multipart, OpenAI's way)."""
    content: dict[str, Any] = {"application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}}
    if multipart is not None:
        content["multipart/form-data"] = {"schema": multipart}
    return {"requestBody": {"required": True, "content": content}}


async def read_fields(request: Request) -> tuple[dict[str, Any], bool]:
    """A create body as fields: a JSON object, or a multipart / urlencoded form (OpenAI's SDK sends every create as
    multipart, nested objects as `name[key]`), each file as (bytes, content type); returns (fields, was a form)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
        except Exception as e:  # malformed multipart, too many parts
            raise ApiError(400, "invalid_body", f"the form body could not be read ({e})", "body") from e
        items: list[tuple[str, Any]] = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                items.append((name, (await value.read(), value.content_type)))
            else:
                items.append((name, value))
        return nest_form(items), True
    try:
        body = await request.json()
    except ValueError as e:
        raise ApiError(400, "invalid_json", f"the request body could not be read as JSON ({e})", "body") from e
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_body", "the request body must be a JSON object", "body")
    return body, False


def validated(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """`model` from a body read by `read_fields`, with FastAPI's own 4xx on invalid fields (naming the field)."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from e


def _file(value: Any, field: str, fallback_type: str) -> str:
    """A form field that may be a file upload -> the URL or data URI the intake reads."""
    if isinstance(value, tuple):
        content, content_type = value
        return upload_as_data_uri(content, content_type, fallback_type)
    if isinstance(value, str):
        return value
    raise ApiError(400, "invalid_parameter", f"{field} must be a file, a URL or a data URI", field)


def openai_edit_body(fields: dict[str, Any]) -> dict[str, Any]:
    """`client.videos.edit` (multipart: prompt + the source as a file or `video[id]`) -> an `EditRequest` body."""
    unknown = sorted(set(fields) - {"prompt", "video"})
    if unknown:
        raise ApiError(400, "unknown_parameter", f"unknown parameter '{unknown[0]}' for a multipart edit", unknown[0])
    body: dict[str, Any] = {"prompt": fields.get("prompt")}
    video = fields.get("video")
    if isinstance(video, dict):
        if set(video) != {"id"}:
            raise ApiError(400, "invalid_parameter", "video must be a file or {\"id\": a done video's id}", "video")
        body["video_id"] = video["id"]
    elif video is not None:
        body["video_url"] = _file(video, "video", "video/mp4")
    return body


def create_api(service: JobService) -> FastAPI:
    app = FastAPI(
        title="Imagine",
        version=__version__,
        description="Self-hosted video + native-audio generation. Every request is an async job.",
    )
    install_error_handlers(app)
    default_limit, route_limits = body_limits(service.config)
    app.add_middleware(BodyLimitMiddleware, default_limit=default_limit, route_limits=route_limits)
    require_principal = principal_dependency(service.keys, service.config.auth)
    app.include_router(create_ops_router(
        service.store, service.ledger, service.config.accounting, require_principal,
        metrics=service.config.metrics, auth_enabled=service.config.auth.enabled,
    ))
    Caller = Depends(require_principal)  # read as a type in the signatures below
    Options = Depends(create_options)  # the create headers
    limits = service.config.limits
    watchers = JobWatchers(service.store.get, PollPolicy(service.config.events_interval_s, limits.event_stream_max_poll_s))
    stream_slots = StreamSlots(limits.max_event_streams_per_key)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        """Liveness: nothing about jobs or tenants (operators read `/metrics`)."""
        return {"status": "ok"}

    @app.get("/v1/models", tags=["models"], dependencies=[Caller], responses=_ERROR_RESPONSES)
    def list_models() -> dict:
        return {"object": "list", "data": [m.model_dump() for m in service.models()]}

    @app.get(
        "/v1/models/{model_id}", tags=["models"], response_model=ModelInfo, responses=_ERROR_RESPONSES, dependencies=[Caller]
    )
    def get_model(model_id: str) -> ModelInfo:
        for m in service.models():
            if m.id == model_id:
                return m
        raise ApiError(404, "model_not_found", f"model {model_id!r} is not served here", "model_id")

    @app.post(
        "/v1/videos/generations", status_code=202, tags=["videos"], response_model=CreatedResponse,
        responses={**_ERROR_RESPONSES, 429: {"description": "A limit was hit (`code` says which); see Retry-After"}},
    )
    def create_generation(
        body: GenerationRequest, response: Response, principal: Principal = Caller, options: CreateOptions = Options
    ) -> CreatedResponse:
        return _accepted(service.create("generation", body, principal, options), response)

    @app.post(
        "/v1/videos/edits", status_code=202, tags=["videos"], response_model=CreatedResponse | OpenAIVideo,
        responses={**_ERROR_RESPONSES, 413: {"description": "Source or mask too large"}, 429: {"description": "A limit was hit"}},
        openapi_extra=_body_schema(EditRequest, {"type": "object", "required": ["prompt", "video"], "properties": {
            "prompt": {"type": "string"}, "video": {"type": "string", "format": "binary"}}}),
    )
    async def create_edit(
        request: Request, response: Response, principal: Principal = Caller, options: CreateOptions = Options
    ) -> Any:
        """Edit a clip by instruction ("remove the man in the background", "add a tree on the left") or by an
        explicit mask; the result keeps the source's frames, fps, size and audio track. JSON (`EditRequest`, 202 +
        request_id) or, as OpenAI's `client.videos.edit` sends it, multipart with the source as a file or
        `video[id]` (200 + OpenAI's video object)."""
        fields, form = await read_fields(request)
        if not form:
            body = validated(EditRequest, fields)
            return _accepted(await run_in_threadpool(service.create, "edit", body, principal, options), response)
        body = validated(EditRequest, openai_edit_body(fields))
        created = await run_in_threadpool(service.create, "edit", body, principal, options, "openai")
        _accepted(created, response)
        response.status_code = 200
        return render_openai(created.job)

    @app.post(
        "/v1/videos/extensions", status_code=501, tags=["videos"], responses={
            **_ERROR_RESPONSES, 501: {"description": "Extensions are not served yet"}},
    )
    async def create_extension(request: Request, principal: Principal = Caller) -> Response:
        """Continue a clip (xAI's and OpenAI's `extensions`): routed, not generated yet (501)."""
        await read_fields(request)  # a bad body is still a 4xx first
        raise ApiError(501, "not_implemented", "video extensions are not served by this server yet", "video")

    @app.post(
        "/v1/videos", status_code=200, tags=["openai"], response_model=OpenAIVideo,
        responses={**_ERROR_RESPONSES, 429: {"description": "A limit was hit (`code` says which); see Retry-After"}},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string"}, "model": {"type": "string"}, "seconds": {"type": "string"},
                "size": {"type": "string"}, "input_reference": {"type": "object", "properties": {
                    "image_url": {"type": "string"}}}}, "additionalProperties": False}},
            "multipart/form-data": {"schema": {"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string"}, "model": {"type": "string"}, "seconds": {"type": "string"},
                "size": {"type": "string"}, "input_reference": {"type": "string", "format": "binary"}}}},
        }}},
    )
    async def openai_create(
        request: Request, response: Response, principal: Principal = Caller, options: CreateOptions = Options
    ) -> OpenAIVideo:
        """OpenAI's `client.videos.create`: prompt, model, seconds, size ("WIDTHxHEIGHT") and an optional
        `input_reference` (an image file, or {image_url}) as the first frame; answers OpenAI's video object."""
        fields, _ = await read_fields(request)
        if isinstance(fields.get("input_reference"), tuple):
            fields["input_reference"] = _file(fields["input_reference"], "input_reference", "image/png")
        body = validated(GenerationRequest, openai_generation_body(fields))
        created = await run_in_threadpool(service.create, "generation", body, principal, options, "openai")
        _accepted(created, response)  # the Idempotent-Replayed header
        return render_openai(created.job)

    @app.get("/v1/videos", tags=["openai"], response_model=OpenAIVideoList, responses=_ERROR_RESPONSES)
    def openai_list(
        principal: Principal = Caller,
        after: str | None = Query(None, max_length=64, description="The last id of the previous page."),
        limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = Query("desc", description="By creation time."),
    ) -> OpenAIVideoList:
        """Your videos (every job of your tenant, whichever API created it), in OpenAI's shape, cursor-paginated."""
        jobs, more = service.list_page(principal.tenant, limit, after, order)
        data = [render_openai(job) for job in jobs]
        return OpenAIVideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                               has_more=more)

    @app.post("/v1/videos/{job_id}/remix", tags=["openai"], response_model=OpenAIVideo, responses={
        **_ERROR_RESPONSES, 429: {"description": "A limit was hit"}})
    def openai_remix(
        job_id: str, body: Remix, response: Response, principal: Principal = Caller, options: CreateOptions = Options
    ) -> OpenAIVideo:
        """OpenAI's remix: the same clip changed as `prompt` says, as an instruction edit of this done video."""
        edit = validated(EditRequest, {"prompt": body.prompt, "video_id": job_id})
        created = service.create("edit", edit, principal, options, "openai")
        _accepted(created, response)
        return render_openai(created.job)

    @app.get("/v1/videos/{job_id}", tags=["videos"], response_model=JobResponse | OpenAIVideo,
             responses=_ERROR_RESPONSES)
    def get_video(job_id: str, request: Request, principal: Principal = Caller) -> JobResponse | OpenAIVideo:
        """The job, in the shape of the API that created it: OpenAI's video object for `POST /v1/videos` (and its
        remix / multipart edit), Imagine's (xAI's shape) for the rest."""
        job = service.get(job_id, principal.tenant)
        if job.dialect == "openai":
            return render_openai(job)
        return service.to_response(job, _base_url(request))

    @app.post("/v1/videos/{job_id}/cancel", tags=["videos"], response_model=JobResponse, responses=_ERROR_RESPONSES)
    def cancel_video(job_id: str, request: Request, principal: Principal = Caller) -> JobResponse:
        return service.to_response(service.cancel(job_id, principal.tenant), _base_url(request))

    @app.delete("/v1/videos/{job_id}", tags=["videos"], response_model=VideoDeleted, responses=_ERROR_RESPONSES)
    def delete_video(job_id: str, principal: Principal = Caller) -> VideoDeleted:
        """Delete the job: cancelled first if it is live, gone from the API at once (404 afterwards), its video and
        stills deleted now, its inputs as soon as it has ended. Its usage stays in the ledger."""
        service.delete(job_id, principal.tenant)
        return VideoDeleted(id=job_id)

    @app.get(
        "/v1/videos/{job_id}/events", tags=["videos"],
        responses={**_ERROR_RESPONSES, 429: {"description": "Too many open event streams of this key; see Retry-After"},
                   200: {"description": "Server-sent `status` events, each the job", "content": {"text/event-stream": {}}}},
        response_class=EventSourceResponse,
    )
    async def video_events(
        job_id: str,
        request: Request,
        principal: Principal = Caller,
        timeout: float = Query(
            3600.0, gt=0, le=86_400,
            description="Close the stream after this many seconds (at most the server's `limits.event_stream_max_s`).",
        ),
    ) -> EventSourceResponse:
        """Server-sent events: a `status` event (the job, as `GET /v1/videos/{id}`) whenever its status or
        progress changes; the stream ends after a terminal status, after `timeout`, or when the job has not changed
        for the server's `limits.event_stream_idle_s` (reconnect to go on). One API key holds at most
        `limits.max_event_streams_per_key` streams open (429 past it)."""
        first = await asyncio.to_thread(service.get, job_id, principal.tenant)  # 404 before the stream starts
        release = stream_slots.try_acquire(principal.key_id or ("tenant", principal.tenant))
        if release is None:
            raise rate_limited(
                "too_many_event_streams",
                f"this API key has {stream_slots.limit} event streams open; close one (or poll GET /v1/videos/{{id}})",
                STREAM_RETRY_AFTER_S,
            )
        base = _base_url(request)
        deadline = time.monotonic() + min(timeout, limits.event_stream_max_s)

        def render(job: JobRecord) -> ServerSentEvent:  # reads the job's usage: run in a worker thread
            return ServerSentEvent(service.to_response(job, base).model_dump_json(), event="status")

        async def events() -> AsyncIterator[ServerSentEvent]:
            job, changed_at = first, time.monotonic()
            yield await asyncio.to_thread(render, job)
            if job.status.terminal:
                return
            async with watchers.subscribe(first) as updates:
                while not job.status.terminal and not updates.ended:
                    wait_s = min(deadline, changed_at + limits.event_stream_idle_s) - time.monotonic()
                    if wait_s <= 0:
                        return  # past `timeout`, or idle: the client reconnects if it still wants to
                    newer = await updates.next_change(wait_s)
                    if newer is not None and job_state(newer) != job_state(job):
                        job, changed_at = newer, time.monotonic()
                        yield await asyncio.to_thread(render, job)

        return _SlotStream(events(), release, ping=15)

    @app.get("/v1/videos/{job_id}/content", tags=["videos"], response_class=StreamingResponse, responses={
        **_ERROR_RESPONSES, 200: {"description": "The MP4 (or a JPEG still)", "content": {"video/mp4": {}, "image/jpeg": {}}},
        206: {"description": "Partial", "content": {"video/mp4": {}}}, 410: {"description": "The video expired (retention)"},
        416: {"description": "Range not satisfiable"},
    })
    def video_content(
        job_id: str, principal: Principal = Caller, range_header: str | None = Header(None, alias="Range"),
        variant: Literal["video", "thumbnail", "spritesheet"] = Query(
            "video", description="The MP4, or a JPEG still made with it: `thumbnail` (one frame) or `spritesheet` "
            "(frames across the clip in a grid)."),
    ) -> Response:
        video = service.content(job_id, principal.tenant, variant)
        if variant != "video":
            data = b"".join(service.artifacts.iter_range(video.key, 0, video.size - 1))
            return Response(data, media_type=STILL_TYPES[variant],
                            headers={"Content-Disposition": f'inline; filename="{job_id}-{variant}.jpg"'})
        rng = parse_range(range_header, video.size)
        body = service.artifacts.iter_range(video.key, rng.start, rng.end)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(rng.end - rng.start + 1),
            "Content-Disposition": f'inline; filename="{job_id}.mp4"',
        }
        if rng.partial:
            headers["Content-Range"] = f"bytes {rng.start}-{rng.end}/{rng.size}"
        return StreamingResponse(body, status_code=206 if rng.partial else 200, media_type="video/mp4", headers=headers)

    return app
