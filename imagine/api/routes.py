"""The FastAPI app: thin routes over `JobService`. Runs inside the Serve ingress, or alone in tests."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from fastapi import FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from imagine import __version__
from imagine.api.errors import ApiError, install_error_handlers
from imagine.api.schemas import (
    CreatedResponse,
    GenerationRequest,
    JobResponse,
    ModelInfo,
)
from imagine.api.service import JobService

_ERROR_RESPONSES = {
    400: {"description": "Bad input (JSON error body names the parameter)"},
    404: {"description": "Unknown id"},
    409: {"description": "Conflicting state"},
    422: {"description": "Invalid parameter"},
}


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def create_api(service: JobService) -> FastAPI:
    app = FastAPI(
        title="Imagine",
        version=__version__,
        description="Self-hosted video + native-audio generation. Every request is an async job.",
    )
    install_error_handlers(app)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):  # noqa: ANN001, ANN202 - ASGI middleware
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > service.config.limits.max_request_bytes:
            err = ApiError(413, "request_too_large", f"body is over {service.config.limits.max_request_bytes} bytes", "body")
            return JSONResponse(err.body(), status_code=413)
        return await call_next(request)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
        counts = service.store.count_by_status()
        return {"status": "ok", "version": __version__, "jobs": counts}

    @app.get("/v1/models", tags=["models"])
    def list_models() -> dict:
        return {"object": "list", "data": [m.model_dump() for m in service.models()]}

    @app.get("/v1/models/{model_id}", tags=["models"], response_model=ModelInfo, responses=_ERROR_RESPONSES)
    def get_model(model_id: str) -> ModelInfo:
        for m in service.models():
            if m.id == model_id:
                return m
        raise ApiError(404, "model_not_found", f"model {model_id!r} is not served here", "model_id")

    @app.post(
        "/v1/videos/generations", status_code=202, tags=["videos"], response_model=CreatedResponse,
        responses=_ERROR_RESPONSES,
    )
    def create_generation(body: GenerationRequest) -> CreatedResponse:
        job = service.create_generation(body)
        return CreatedResponse(request_id=job.id)

    @app.get("/v1/videos/{job_id}", tags=["videos"], response_model=JobResponse, responses=_ERROR_RESPONSES)
    def get_video(job_id: str, request: Request) -> JobResponse:
        return service.to_response(service.get(job_id), _base_url(request))

    @app.post("/v1/videos/{job_id}/cancel", tags=["videos"], response_model=JobResponse, responses=_ERROR_RESPONSES)
    def cancel_video(job_id: str, request: Request) -> JobResponse:
        return service.to_response(service.cancel(job_id), _base_url(request))

    @app.get("/v1/videos/{job_id}/events", tags=["videos"], responses=_ERROR_RESPONSES)
    async def video_events(
        job_id: str,
        request: Request,
        timeout: float = Query(3600.0, gt=0, le=86_400, description="Close the stream after this many seconds."),
    ) -> EventSourceResponse:
        """Server-sent events: a `status` event (the job, as `GET /v1/videos/{id}`) whenever its status or
        progress changes; the stream ends after a terminal status (or `timeout`; reconnect to go on)."""
        first = await asyncio.to_thread(service.get, job_id)  # 404 before the stream starts
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
                job = await asyncio.to_thread(service.get, job_id)

        return EventSourceResponse(events(), ping=15)

    @app.get("/v1/videos/{job_id}/content", tags=["videos"], responses={**_ERROR_RESPONSES, 206: {"description": "Partial"}})
    def video_content(job_id: str, range_header: str | None = Header(None, alias="Range")) -> Response:
        rng, body = service.content(job_id, range_header)
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(rng.end - rng.start + 1),
            "Content-Disposition": f'inline; filename="{job_id}.mp4"',
        }
        if rng.partial:
            headers["Content-Range"] = f"bytes {rng.start}-{rng.end}/{rng.size}"
        return StreamingResponse(body, status_code=206 if rng.partial else 200, media_type="video/mp4", headers=headers)

    return app
