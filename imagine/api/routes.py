"""The FastAPI app: thin routes over `JobService`. Runs inside the Serve ingress, or alone in tests.
Every /v1 route needs a principal (`imagine.api.auth`); every job route is scoped to its tenant."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from imagine import __version__
from imagine.api.auth import principal_dependency
from imagine.api.errors import ApiError, install_error_handlers
from imagine.api.http import create_options, parse_range
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

_ERROR_RESPONSES = {
    400: {"description": "Bad input (JSON error body names the parameter)"},
    401: {"description": "Missing, unknown or revoked API key"},
    404: {"description": "Unknown id (or another tenant's)"},
    409: {"description": "Conflicting state"},
    422: {"description": "Invalid parameter"},
}


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
    require_principal = principal_dependency(service.keys, service.config.auth)
    app.include_router(create_ops_router(service.store, service.ledger, service.config.accounting, require_principal))
    Caller = Depends(require_principal)  # read as a type in the signatures below
    Options = Depends(create_options)  # the create headers

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.config.limits.max_request_bytes:
            err = ApiError(413, "request_too_large", f"body is over {service.config.limits.max_request_bytes} bytes", "body")
            return JSONResponse(err.body(), status_code=413)
        return await call_next(request)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        counts = service.store.count_by_status()
        return {"status": "ok", "version": __version__, "jobs": counts}

    @app.get("/v1/models", tags=["models"], dependencies=[Caller])
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

    @app.get("/v1/videos/{job_id}/events", tags=["videos"], responses=_ERROR_RESPONSES)
    async def video_events(
        job_id: str,
        request: Request,
        principal: Principal = Caller,
        timeout: float = Query(3600.0, gt=0, le=86_400, description="Close the stream after this many seconds."),
    ) -> EventSourceResponse:
        """Server-sent events: a `status` event (the job, as `GET /v1/videos/{id}`) whenever its status or
        progress changes; the stream ends after a terminal status (or `timeout`; reconnect to go on)."""
        first = await asyncio.to_thread(service.get, job_id, principal.tenant)  # 404 before the stream starts
        base = _base_url(request)
        interval = service.config.events_interval_s

        async def events() -> AsyncIterator[ServerSentEvent]:
            job, last, deadline = first, None, time.monotonic() + timeout
            while True:
                key = (job.status, round(job.progress, 4))
                if key != last:
                    last = key
                    yield ServerSentEvent(service.to_response(job, base).model_dump_json(), event="status")
                if job.status.terminal or time.monotonic() > deadline or await request.is_disconnected():
                    return
                await asyncio.sleep(interval)
                job = await asyncio.to_thread(service.get, job_id, principal.tenant)

        return EventSourceResponse(events(), ping=15)

    @app.get("/v1/videos/{job_id}/content", tags=["videos"], responses={**_ERROR_RESPONSES, 206: {"description": "Partial"}})
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
