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
from imagine.models.loading import load_components, move_components, resolve_model_dir
from imagine.models.presets import ModelPreset, get_preset
from imagine.serving.runner import LocalLoop, Sampler

logger = logging.getLogger(__name__)


# Auto rank setup timeout (`parallel.setup_timeout_s: null`): a fixed part for starting the actors and joining the
# process group, plus loading and sharding the weights at no less than 0.1 GiB/s per rank from local disk (a local
# NVMe reads >1 GiB/s; every rank of a node reads the same files at once, and a tensor-parallel rank also splits
# them): 10 s per GiB, with room for a slow disk. LTX-2's 38 GiB denoiser weights: ~500 s.
RANK_SETUP_BASE_S = 120.0
RANK_SETUP_S_PER_GIB = 10.0
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def configure_torch(config: AppConfig) -> None:
    """Per-process torch settings of a process that runs a model (a stage replica, a rank): intra-op threads, and
    on CUDA whether float32 matmuls and cuDNN convolutions may use TF32 (`model.tf32`; torch's own default allows
    it for convolutions only). Process-wide flags: call once, before the model runs."""
    if config.model.torch_threads:
        torch.set_num_threads(config.model.torch_threads)
    if config.model.on_cuda:
        torch.backends.cuda.matmul.allow_tf32 = config.model.tf32
        torch.backends.cudnn.allow_tf32 = config.model.tf32


def rank_setup_timeout_s(weight_bytes: int) -> float:
    """The auto bound on a rank group's setup for a sampler of `weight_bytes` of weights (see RANK_SETUP_*)."""
    if weight_bytes < 0:
        raise ValueError(f"weight_bytes must be >= 0, got {weight_bytes}")
    return RANK_SETUP_BASE_S + RANK_SETUP_S_PER_GIB * weight_bytes / 2**30


def weight_bytes(model_dir: Path, components: list[str]) -> int:
    """Bytes of the weight files (`*.safetensors`, `*.bin`) in the folders of `components` under `model_dir`: what
    loading those components reads from disk (a folder holding both formats counts both: an upper bound)."""
    return sum(
        f.stat().st_size
        for name in components
        if (model_dir / name).is_dir()
        for f in (model_dir / name).iterdir()
        if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
    )


def pool_setup_timeout_s(config: AppConfig, pool: str) -> float:
    """How long pool `pool`'s rank group may take to start: `parallel.setup_timeout_s`, or the auto bound for the
    weights its sampler loads. Resolves the model directory here first (an s3:// model is downloaded once, on this
    replica's node, which its STRICT_PACK ranks share), so the ranks only ever load from local disk."""
    explicit = config.sampler_pools()[pool].parallel.setup_timeout_s
    preset = pool_preset(config, pool)
    model_dir = preset_dir(config, preset)
    if explicit is not None:
        return explicit
    return rank_setup_timeout_s(weight_bytes(model_dir, sampler_class(preset.family).components))


def rank_load_device(device: str, tensor: int) -> str:
    """Where a rank loads its pool's weights before sharding: the CPU for a tensor-parallel rank on an accelerator
    (AutoTP splits host weights and moves each shard to the rank's device, so the device never holds the whole
    model), else straight onto `device`."""
    return "cpu" if tensor > 1 and torch.device(device).type != "cpu" else device


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


def load_pool_components(config: AppConfig, pool: str, device: str) -> tuple[type, dict[str, Any]]:
    """(sampler class, its components loaded onto `device`) of pool `pool`."""
    preset = pool_preset(config, pool)
    cls = sampler_class(preset.family)
    started = time.perf_counter()
    model_dir = preset_dir(config, preset)
    loaded = load_components(model_dir, cls.components, device, torch_dtype(config.model.resolved_dtype))
    logger.info(
        "pool %s loaded %s from %s onto %s in %.2fs", pool, cls.components, model_dir, device,
        time.perf_counter() - started,
    )
    return cls, loaded


def load_pool_sampler(config: AppConfig, pool: str, device: str) -> tuple[Sampler, dict[str, Any]]:
    """Load pool `pool`'s sampler components onto `device` and build its sampler; returns (sampler, components)."""
    cls, loaded = load_pool_components(config, pool, device)
    return cls(loaded, device, torch_dtype(config.model.resolved_dtype)), loaded


class SamplerRank(LocalLoop):
    """One rank of a parallel denoiser replica (built inside its Ray rank worker once the process group is up):
    loads the pool's sampler, shards its transformer (sequence and/or tensor parallel) and runs the same loop as
    every other rank; rank 0's results are the replica's.

    What holds what: a sequence-parallel rank loads every component straight onto its device (each rank holds the
    whole model). A tensor-parallel rank on an accelerator loads them into host memory (`rank_load_device`; every
    rank of the node holds a full host copy for a moment), shards the transformer there -- DeepSpeed's
    `init_inference` (keep_module_on_host left False) moves each weight shard to this rank's device as it splits it,
    then the replicated rest of the transformer -- and only then moves the other components (the VAEs) onto the
    device, so the device never holds more than its shard plus the replicated parts."""

    def __init__(self, config: AppConfig, pool: str, rank: int, world_size: int):
        from imagine.parallel import enable_parallel

        self.rank = rank
        parallel = config.sampler_pools()[pool].parallel
        device = config.model.device
        if config.model.on_cuda:
            device = f"cuda:{torch.cuda.current_device()}"  # Ray gave this rank one GPU
        configure_torch(config)
        load_device = rank_load_device(device, parallel.tensor)
        cls, loaded = load_pool_components(config, pool, load_device)
        self.parallel = enable_parallel(loaded["transformer"], sequence=parallel.sequence, tensor=parallel.tensor)
        if load_device != device:
            move_components(loaded, device)
        super().__init__(cls(loaded, device, torch_dtype(config.model.resolved_dtype)))

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
