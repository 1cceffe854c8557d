"""Helpers of the Ray-tier tests: the small app config they share, a client of one deployed app, the request sizes
they use, and a bounded wait."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from imagine.config import AppConfig
from imagine.parallel.dist import free_port

# small clips keep the suite fast on 2 cores: 1 s, 480x480 -> 25 frames
SMALL = {"duration": 1, "resolution": "480p", "aspect_ratio": "1:1", "num_inference_steps": 3}
# a job with many cheap steps, to observe and cancel mid-loop
LONG = {"duration": 1, "resolution": "480p", "aspect_ratio": "16:9", "num_inference_steps": 100}


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def small_config(home: Path | str, stage_cpus: float = 0.15, **overrides: Any) -> AppConfig:
    """An app that fits 2 cores: auth off, the tiny model on one torch thread, every stage one request at a time on
    `stage_cpus` CPUs, edits off; `overrides` are AppConfig fields, merged into those (nested dicts too)."""
    small = {"num_cpus": stage_cpus, "max_ongoing_requests": 1}
    base = {
        "home": str(home),
        "poll_interval_s": 0.2,
        "auth": {"enabled": False},  # keys and tenants have their own tests (test_auth.py)
        "model": {"preset": "tiny", "torch_threads": 1},
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 64},
        "text_encoder": small,
        "denoiser": small,
        "decoder": small,
        "grounder": small,
        "edit_codec": small,
        "editor": small,
        "edit": {"enabled": False},  # the edit path has its own Serve tests (test_edit_serving.py)
    }
    return AppConfig.model_validate(_merged(base, overrides))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s")
        time.sleep(interval_s)


class Served:
    def __init__(self, config: AppConfig, port: int):
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def deploy(self) -> None:
        from ray import serve

        from imagine.serving.app import build_app

        serve.run(build_app(self.config), name="imagine", route_prefix="/")

    def submit(self, priority: str = "standard", **body) -> str:
        resp = self.http.post(
            "/v1/videos/generations",
            json={"prompt": "a drum solo on a beach", **body},
            headers={"X-Priority": priority},
        )
        assert resp.status_code == 202, resp.text
        return resp.json()["request_id"]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/v1/videos/{job_id}").json()

    def wait_for(self, job_id: str, predicate, timeout: float = 180.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if predicate(job):
                return job
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting on job {job_id}: {self.job(job_id)}")

    def wait_terminal(self, job_id: str, timeout: float = 180.0) -> dict:
        return self.wait_for(job_id, lambda j: j["status"] in ("done", "failed", "cancelled"), timeout)


@contextmanager
def serve_app(config: AppConfig) -> Iterator[Served]:
    """Deploy `config`'s app on the session's Ray (the `ray_session` fixture must be up) with Serve's HTTP proxy on
    a free loopback port; yield its client; shut Serve down after."""
    import ray
    from ray import serve

    assert ray.is_initialized(), "serve_app needs the ray_session fixture"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    served = Served(config, port)
    try:
        served.deploy()
        yield served
    finally:
        served.http.close()
        serve.shutdown()
