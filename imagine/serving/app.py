"""`build_app`: the one place that turns an `AppConfig` into the bound Serve graph
(ingress -> scheduler -> text encoder / denoiser / decoder). `serve_config.yaml` points here."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from imagine.api.routes import create_api
from imagine.api.service import JobService
from imagine.config import AppConfig
from imagine.jobs import JobStore
from imagine.serving.autoscaling import POLICY_PATH
from imagine.serving.scheduler import SchedulerServer
from imagine.serving.stages import (
    DecoderServer,
    DenoiserServer,
    TextEncoderServer,
    served_preset,
)
from imagine.storage import open_artifact_store


class IngressServer:
    """FastAPI over `JobService`; nudges the scheduler when jobs are queued.

    Nudges are coalesced: at most one scheduler call per `NUDGE_INTERVAL_S` however many jobs arrive
    (the scheduler claims everything queued on a nudge), instead of one actor call per submission."""

    NUDGE_INTERVAL_S = 0.02

    def __init__(self, config: AppConfig, scheduler: DeploymentHandle):
        self.config = config
        self.scheduler = scheduler
        self._nudge_wanted = threading.Event()
        self._nudger = asyncio.get_running_loop().create_task(self._send_nudges())
        preset = served_preset(config)
        self.service = JobService(
            config,
            JobStore(config.resolved_database_url),
            open_artifact_store(str(config.resolved_artifacts_dir)),
            presets={preset.name: preset},
            default_model=preset.name,
            notify=self._nudge,
        )

    def _nudge(self) -> None:  # called from request threads
        self._nudge_wanted.set()

    async def _send_nudges(self) -> None:
        while True:
            await asyncio.sleep(self.NUDGE_INTERVAL_S)
            if self._nudge_wanted.is_set():
                self._nudge_wanted.clear()
                self.scheduler.nudge.remote()

    def __serve_build_asgi_app__(self):  # noqa: ANN204 - Serve hook returning the ASGI app
        return create_api(self.service)


def _deployment(cls: type, name: str, options: dict[str, Any]) -> serve.Deployment:
    return serve.deployment(cls, name=name, **options)


def build_app(args: dict[str, Any] | AppConfig | None = None) -> serve.Application:
    """Serve application builder (`import_path: imagine.serving.app:build_app`); `args` are AppConfig fields."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    # fail fast in the caller's process on a bad preset name, not in every replica
    preset = served_preset(config)
    prices = config.accounting.price_per_second_usd.get(preset.name)
    if prices is None or not {"480p", "720p"} <= set(prices):
        raise ValueError(
            f"accounting.price_per_second_usd must price model {preset.name!r} at 480p and 720p, got {prices!r}"
        )

    encoder = _deployment(TextEncoderServer, "TextEncoder", config.text_encoder.serve_options()).bind(config)
    denoiser_opts = config.denoiser.serve_options()
    # scale on the job queue (exported by the replicas), not on Serve's request counts: see autoscaling.py
    denoiser_opts["autoscaling_config"]["policy"] = {"policy_function": POLICY_PATH}
    denoiser = _deployment(DenoiserServer, "Denoiser", denoiser_opts).bind(config)
    decoder = _deployment(DecoderServer, "Decoder", config.decoder.serve_options()).bind(config)
    scheduler_opts = config.scheduler.serve_options()
    scheduler_opts.pop("autoscaling_config")
    scheduler_opts["num_replicas"] = 1  # one dispatcher: its queue view is the store's
    scheduler = _deployment(SchedulerServer, "Scheduler", scheduler_opts).bind(config, encoder, denoiser, decoder)
    ingress_cls = serve.ingress()(IngressServer)
    return _deployment(ingress_cls, "Ingress", config.ingress.serve_options()).bind(config, scheduler)
