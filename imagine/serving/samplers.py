"""Which model each deployment runs and which sampler each denoiser pool drives, from config: preset resolution
(with the config's `source` overrides), the family -> sampler table, and `SamplerRank`, one rank of a parallel
pool. No Ray here."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from imagine.config import EDIT_POOL, AppConfig
from imagine.models.loading import load_components, resolve_model_dir
from imagine.models.presets import ModelPreset, get_preset
from imagine.serving.runner import LocalLoop, Sampler

logger = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _configured_preset(name: str, source: str | None, family: str, field: str) -> ModelPreset:
    """Preset `name` (config field `field`), checked to be of `family`, with the config's `source` override."""
    preset = get_preset(name)
    if preset.family != family:
        raise ValueError(f"{field} {preset.name!r} is a {preset.family} model; this needs a {family} preset")
    return preset.model_copy(update={"source": source}) if source else preset


def served_preset(config: AppConfig) -> ModelPreset:
    """The generation preset, with the config's `model.source` override applied."""
    return _configured_preset(config.model.preset, config.model.source, "ltx2", "model.preset")


def served_edit_preset(config: AppConfig) -> ModelPreset | None:
    """The edit model preset (with the config's `edit.source` override), or None when edits are off."""
    if not config.edit.enabled:
        return None
    return _configured_preset(config.edit.preset, config.edit.source, "wan_vace", "edit.preset")


def served_grounding_preset(config: AppConfig) -> ModelPreset | None:
    """The grounding preset (with the config's `edit.grounding_source` override), or None when edits are off."""
    if not config.edit.enabled:
        return None
    return _configured_preset(
        config.edit.grounding_preset, config.edit.grounding_source, "grounding", "edit.grounding_preset"
    )


def pool_preset(config: AppConfig, pool: str) -> ModelPreset:
    """The preset the sampler of denoiser pool `pool` runs."""
    if pool == EDIT_POOL:
        preset = served_edit_preset(config)
        if preset is None:
            raise ValueError("pool 'editor' needs edits enabled (edit.enabled)")
        return preset
    if pool not in config.denoiser_pools():
        raise ValueError(f"no denoiser pool {pool!r}; pools: {sorted(config.sampler_pools())}")
    return served_preset(config)


def preset_dir(config: AppConfig, preset: ModelPreset) -> Path:
    """The local diffusers-layout directory of `preset` (built, or fetched from S3, on first use)."""
    return resolve_model_dir(preset, config.home, endpoint_url=config.model.s3_endpoint_url)


def component_config(config: AppConfig, preset: ModelPreset, component: str) -> dict[str, Any]:
    """One component's `config.json` without loading its weights (builtin presets are built on first use)."""
    return json.loads((preset_dir(config, preset) / component / "config.json").read_text())


def transformer_config(config: AppConfig) -> dict[str, Any]:
    """The generation transformer's `config.json` (for the routing cost model), without loading weights; the builtin
    tiny model's comes from code, so the driver and the ingress replicas build no model for it."""
    preset = served_preset(config)
    if preset.is_builtin:
        from imagine.models.tiny import TRANSFORMER_CONFIG

        return dict(TRANSFORMER_CONFIG)
    return component_config(config, preset, "transformer")


def sampler_class(family: str) -> type:
    """The resumable sampler of a model family (see `imagine.serving.runner.Sampler`)."""
    if family == "ltx2":
        from imagine.pipeline.denoise import DenoiserStage

        return DenoiserStage
    if family == "wan_vace":
        from imagine.pipeline.vace import VaceSampler

        return VaceSampler
    raise ValueError(f"no sampler for model family {family!r}")


def load_pool_sampler(config: AppConfig, pool: str, device: str) -> tuple[Sampler, dict[str, Any]]:
    """Load pool `pool`'s sampler components onto `device` and build its sampler; returns (sampler, components)."""
    preset = pool_preset(config, pool)
    cls = sampler_class(preset.family)
    dtype = torch_dtype(config.model.dtype)
    started = time.perf_counter()
    model_dir = preset_dir(config, preset)
    loaded = load_components(model_dir, cls.components, device, dtype)
    logger.info("pool %s loaded %s from %s in %.2fs", pool, cls.components, model_dir, time.perf_counter() - started)
    return cls(loaded, device, dtype), loaded


class SamplerRank(LocalLoop):
    """One rank of a parallel denoiser replica (built inside its Ray rank worker once the process group is up):
    loads the pool's sampler, shards its transformer (sequence and/or tensor parallel) and runs the same loop as
    every other rank; rank 0's results are the replica's."""

    def __init__(self, config: AppConfig, pool: str, rank: int, world_size: int):
        from imagine.parallel import enable_parallel

        self.rank = rank
        parallel = config.sampler_pools()[pool].parallel
        device = config.model.device
        if device.startswith("cuda"):
            device = f"cuda:{torch.cuda.current_device()}"  # Ray gave this rank one GPU
        if config.model.torch_threads:
            torch.set_num_threads(config.model.torch_threads)
        sampler, loaded = load_pool_sampler(config, pool, device)
        self.parallel = enable_parallel(loaded["transformer"], sequence=parallel.sequence, tensor=parallel.tensor)
        super().__init__(sampler)

    def begin(self, request: Any, conditioning: Any, resume: Any | None) -> tuple[int, int]:
        with torch.inference_mode():
            return super().begin(request, conditioning, resume)

    def step(self) -> int:
        with torch.inference_mode():
            return super().step()

    def snapshot(self) -> Any:
        state = super().snapshot()
        return state if self.rank == 0 else None  # every rank holds the same state: only rank 0's travels

    def finish(self) -> Any:
        with torch.inference_mode():
            output = super().finish()
        return output if self.rank == 0 else None
