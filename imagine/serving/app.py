"""`build_app`: the one place that turns an `AppConfig` into the bound Serve graph
(ingress -> scheduler -> text encoder / denoiser / decoder). `serve_config.yaml` points here."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from imagine.api.routes import create_api
from imagine.api.service import JobService
from imagine.config import AppConfig
from imagine.jobs import GenerationParams, JobStore
from imagine.serving.autoscaling import POLICY_PATH
from imagine.serving.samplers import served_edit_preset, served_grounding_preset, served_preset, transformer_config
from imagine.serving.scheduler import SchedulerServer, denoiser_deployment_name
from imagine.serving.stages import DecoderServer, DenoiserServer, TextEncoderServer
from imagine.storage import open_artifact_store


class IngressServer:
    """FastAPI over `JobService`; nudges the scheduler when jobs are queued.

    Nudges are coalesced: at most one scheduler call per `NUDGE_INTERVAL_S` however many jobs arrive
    (the scheduler claims everything queued on a nudge), instead of one actor call per submission; an idle
    ingress sleeps on an event rather than polling."""

    NUDGE_INTERVAL_S = 0.02

    def __init__(self, config: AppConfig, scheduler: DeploymentHandle):
        self.config = config
        self.scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._nudge_wanted = asyncio.Event()
        self._nudger = self._loop.create_task(self._send_nudges())
        preset = served_preset(config)
        edit_preset = served_edit_preset(config)
        self.service = JobService(
            config,
            JobStore(config.resolved_database_url, migrate=config.migrate_on_start),
            open_artifact_store(config),
            presets={preset.name: preset},
            default_model=preset.name,
            notify=self._nudge,
            edit_presets={edit_preset.name: edit_preset} if edit_preset is not None else None,
            router=build_router(config),
        )

    def _nudge(self) -> None:  # called from request threads
        self._loop.call_soon_threadsafe(self._nudge_wanted.set)

    async def _send_nudges(self) -> None:
        while True:
            await self._nudge_wanted.wait()
            await asyncio.sleep(self.NUDGE_INTERVAL_S)  # gather the submissions of this interval into one nudge
            self._nudge_wanted.clear()
            self.scheduler.nudge.remote()

    def __serve_build_asgi_app__(self):
        return create_api(self.service)


def _deployment(cls: type, name: str, options: dict[str, Any]) -> serve.Deployment:
    return serve.deployment(cls, name=name, **options)


def denoiser_options(config: AppConfig, pool: str) -> dict[str, Any]:
    """Serve options of one denoiser pool. A parallel pool's replica reserves its ranks' devices as one
    STRICT_PACK placement group (one node): bundle 0 for the replica (no GPU: it drives the ranks and runs no
    model), one `{GPU: 1}` bundle per rank."""
    from imagine.serving.ranks import rank_bundles

    cfg = config.sampler_pools()[pool]
    opts = config.stage_options(pool)
    # scale on the job queue (read from the store by the controller, so a pool at zero replicas sees its demand) and
    # the replicas' denoising counts, not on Serve's request counts: see autoscaling.py
    opts["autoscaling_config"]["policy"] = {
        "policy_function": POLICY_PATH,
        "policy_kwargs": {
            "pool": pool,
            "database_url": config.database_url,  # None: the controller resolves $IMAGINE_DATABASE_URL itself
            "sqlite_default": config.sqlite_default_url,
        },
    }
    if cfg.parallel.degree > 1:
        device = "cuda" if config.model.on_cuda else "cpu"
        opts["ray_actor_options"] = {"num_cpus": max(cfg.num_cpus, 0.01), "num_gpus": 0}
        opts["placement_group_bundles"] = rank_bundles(
            cfg.parallel.degree, device, cfg.parallel.cpus_per_rank, max(cfg.num_cpus, 0.01),
            config.ranks_hold_gpus(pool),
        )
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def build_router(config: AppConfig) -> Callable[[GenerationParams], str] | None:
    """Generation params -> denoiser pool, when more than one pool is declared (see `imagine.parallel.routing`)."""
    if not config.denoiser_variants:
        return None
    from imagine.models.ltx2 import ltx2_transformer_dims
    from imagine.parallel.routing import Budget, Candidate, Router

    r = config.routing
    dims = ltx2_transformer_dims(transformer_config(config))
    router = Router(
        dims,
        [Candidate(pool, cfg.parallel.sequence, cfg.parallel.tensor) for pool, cfg in config.denoiser_pools().items()],
        Budget(
            device_memory_bytes=r.device_memory_gib * 2**30,
            reserve_bytes=r.reserve_gib * 2**30,
            bytes_per_param=4 if config.model.resolved_dtype == "float32" else 2,
            bytes_per_activation=4 if config.model.resolved_dtype == "float32" else 2,
            peak_flops=r.peak_tflops * 1e12,
            mfu=r.mfu,
            link_bytes_per_s=r.link_gbps * 1e9,
            max_denoise_s=r.max_denoise_s,
        ),
    )

    def route(params: GenerationParams) -> str:
        return router.route(params.num_frames, params.height, params.width, params.num_frames / params.fps)

    return route


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

    edit_preset = served_edit_preset(config)
    if edit_preset is not None:
        edit_prices = config.accounting.price_per_second_usd.get(edit_preset.name)
        if edit_prices is None or not {"480p", "720p"} <= set(edit_prices):
            raise ValueError(
                f"accounting.price_per_second_usd must price edit model {edit_preset.name!r} at 480p and 720p, "
                f"got {edit_prices!r}"
            )
    served_grounding_preset(config)  # a bad grounding preset fails here too
    build_router(config)  # a bad routing setup fails here, not in the ingress replicas

    encoder = _deployment(TextEncoderServer, "TextEncoder", config.stage_options("text_encoder")).bind(config)
    # every denoiser pool, the editor's (Wan VACE) included: the same deployment class, its preset chosen by pool
    denoisers = {
        pool: _deployment(DenoiserServer, denoiser_deployment_name(pool), denoiser_options(config, pool)).bind(config, pool)
        for pool in config.sampler_pools()
    }
    decoder = _deployment(DecoderServer, "Decoder", config.stage_options("decoder")).bind(config)
    grounder = edit_codec = None
    if edit_preset is not None:
        from imagine.serving.edits import EditCodecServer, GrounderServer

        grounder = _deployment(GrounderServer, "Grounder", config.stage_options("grounder")).bind(config)
        edit_codec = _deployment(EditCodecServer, "EditCodec", config.stage_options("edit_codec")).bind(config)
    scheduler_opts = config.stage_options("scheduler")
    scheduler_opts.pop("autoscaling_config")
    scheduler_opts["num_replicas"] = 1  # one dispatcher: its queue view is the store's
    scheduler = _deployment(SchedulerServer, "Scheduler", scheduler_opts).bind(
        config, encoder, denoisers, decoder, grounder, edit_codec
    )
    ingress_cls = serve.ingress()(IngressServer)
    return _deployment(ingress_cls, "Ingress", config.stage_options("ingress")).bind(config, scheduler)
