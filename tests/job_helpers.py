"""Typed job params for store, ledger and dispatcher tests that need a job but not a request (imported like
`serve_helpers`)."""

from __future__ import annotations

from typing import Any

from imagine.jobs import GenerationParams, NewJob


def generation_params(**overrides: Any) -> GenerationParams:
    """A 2 s 480p generation's params (what intake makes of `{"prompt": "p", "duration": 2, "seed": 1}`), with
    `overrides`."""
    fields: dict[str, Any] = {
        "prompt": "p", "negative_prompt": "", "duration": 2.0, "resolution": "480p", "aspect_ratio": "16:9", "seed": 1,
        "num_inference_steps": 2, "guidance_scale": 3.0, "fps": 24.0, "width": 864, "height": 480, "num_frames": 49,
        "image_key": None,
    }
    return GenerationParams(**{**fields, **overrides})


def generation_job(model: str = "tiny", params: dict[str, Any] | None = None, **job: Any) -> NewJob:
    """A queued-to-be generation job of `model` with `generation_params(**params)`; `job`: other NewJob fields."""
    return NewJob(kind="generation", model=model, params=generation_params(**(params or {})), **job)
