"""The FastAPI app: thin routes over `JobService`. Runs inside the Serve ingress, or alone in tests.
Every /v1 route needs a principal (`imagine.api.auth`); every job route is scoped to its tenant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from imagine import __version__
from imagine.api.auth import principal_dependency
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
        "/v1/videos/edits", status_code=202, tags=["videos"], response_model=CreatedResponse,
        responses={**_ERROR_RESPONSES, 413: {"description": "Source or mask too large"}, 429: {"description": "A limit was hit"}},
    )
    def create_edit(
        body: EditRequest, response: Response, principal: Principal = Caller, options: CreateOptions = Options
    ) -> CreatedResponse:
        """Edit a clip by instruction ("remove the man in the background", "add a tree on the left") or by an
        explicit mask; the result keeps the source's frames, fps, size and audio track."""
        return _accepted(service.create("edit", body, principal, options), response)

    @app.get("/v1/videos/{job_id}", tags=["videos"], response_model=JobResponse, responses=_ERROR_RESPONSES)
    def get_video(job_id: str, request: Request, principal: Principal = Caller) -> JobResponse:
        return service.to_response(service.get(job_id, principal.tenant), _base_url(request))

    @app.post("/v1/videos/{job_id}/cancel", tags=["videos"], response_model=JobResponse, responses=_ERROR_RESPONSES)
    @app.delete(
        "/v1/videos/{job_id}", tags=["videos"], response_model=JobResponse, responses=_ERROR_RESPONSES,
        summary="Cancel Video (OpenAI-style alias of POST /v1/videos/{job_id}/cancel)",
    )
    def cancel_video(job_id: str, request: Request, principal: Principal = Caller) -> JobResponse:
        return service.to_response(service.cancel(job_id, principal.tenant), _base_url(request))

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
        **_ERROR_RESPONSES, 200: {"description": "The MP4", "content": {"video/mp4": {}}},
        206: {"description": "Partial", "content": {"video/mp4": {}}}, 410: {"description": "The video expired (retention)"},
        416: {"description": "Range not satisfiable"},
    })
    def video_content(
        job_id: str, principal: Principal = Caller, range_header: str | None = Header(None, alias="Range")
    ) -> Response:
        video = service.content(job_id, principal.tenant)
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
