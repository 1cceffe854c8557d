"""Server / cluster configuration: one pydantic tree that flows from serve_config.yaml or CLI flags
down to every deployment and stage. Model presets live in ``imagine.models.presets``; per-request
parameters live in ``imagine.api.schemas``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

DTYPES = ("float32", "bfloat16", "float16")
DATABASE_URL_ENV = "IMAGINE_DATABASE_URL"  # the job store's URL when `database_url` is unset
METRICS_TOKEN_ENV = "IMAGINE_METRICS_TOKEN"  # the /metrics scrape token when `metrics.token` is unset


def default_home() -> Path:
    """``$IMAGINE_HOME`` or ``~/.cache/imagine``: model cache, SQLite file and local artifacts."""
    return Path(os.environ.get("IMAGINE_HOME") or Path.home() / ".cache" / "imagine").expanduser()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which model preset the generation deployments load, and where they run it."""

    preset: str = Field("tiny", description="Model preset name (see `GET /v1/models`); `tiny` is random-init.")
    source: str | None = Field(
        None,
        description="Override of the preset's weight location: a local directory or an s3://bucket/prefix URI.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store for s3:// sources (None = AWS default)."
    )
    device: str = Field("cpu", description="torch device for the model stages, e.g. `cpu` or `cuda`.")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="torch dtype the weights are loaded in; None = auto: bfloat16 on `cuda[:N]`, float32 elsewhere "
        "(see `resolved_dtype`).",
    )
    tf32: bool = Field(
        True, description="TF32 matmuls and cuDNN convolutions for float32 work on CUDA (off: full float32 products)."
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads per replica (None = torch default)."
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value.split(":")[0] not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be cpu, cuda[:N] or mps, got {value!r}")
        return value

    @property
    def on_cuda(self) -> bool:
        """Whether the model stages run on a CUDA device (`cuda` or `cuda:N`)."""
        return self.device.split(":")[0] == "cuda"

    @property
    def resolved_dtype(self) -> str:
        """The dtype the weights are loaded in: `dtype`, or bfloat16 on CUDA (what LTX-2 and Wan are trained and
        served in; half the memory and several times the tensor-core rate of float32) and float32 elsewhere (CPU
        kernels are fastest and exact in float32)."""
        if self.dtype is not None:
            return self.dtype
        return "bfloat16" if self.on_cuda else "float32"


class AutoscalingConfig(_Strict):
    """Ray Serve autoscaling for one deployment (passed through as `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, le=1000, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, le=1000, description="Upper bound on replicas.")
    initial_replicas: int | None = Field(None, ge=0, le=1000, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(1.0, gt=0, description="Per-replica load the autoscaler aims for.")
    upscale_delay_s: float = Field(3.0, ge=0, description="Seconds of sustained load before adding replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds of low load before removing replicas.")
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Seconds idle before the last replica goes (min_replicas 0); None: downscale_delay_s."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class DeploymentConfig(_Strict):
    """Resources and scaling of one Serve deployment."""

    num_cpus: float = Field(0.25, ge=0, description="CPUs reserved per replica.")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs reserved per replica; None = auto: 1 for a deployment that runs a model (text_encoder, "
        "decoder, grounder, edit_codec, every denoiser pool) when `model.device` is cuda, else 0. A fraction (0.5) "
        "lets two stages share a card.",
    )
    max_ongoing_requests: int = Field(1, ge=1, le=10_000, description="Concurrent requests per replica.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    access_log: bool = Field(True, description="Serve's per-request access log lines (off saves CPU at high rates).")

    def gpus(self, runs_model: bool = False, cuda: bool = False) -> float:
        """GPUs one replica reserves: `num_gpus` when set, else (auto) one for a deployment that runs a model on
        CUDA and none otherwise. Without a reservation Ray hides no GPU from the replica and it lands on cuda:0,
        beside every other unreserved one. `AppConfig.stage_options` says which deployments run a model."""
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if runs_model and cuda else 0.0

    def ray_actor_options(self, runs_model: bool = False, cuda: bool = False) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.gpus(runs_model, cuda)}

    def serve_options(self, runs_model: bool = False, cuda: bool = False) -> dict[str, Any]:
        return {
            "ray_actor_options": self.ray_actor_options(runs_model, cuda),
            "max_ongoing_requests": self.max_ongoing_requests,
            "autoscaling_config": self.autoscaling.model_dump(exclude_none=True),
            "logging_config": {"enable_access_log": self.access_log},
        }


class ParallelConfig(_Strict):
    """Devices one denoiser replica spans: `sequence` x `tensor` ranks on ONE node (STRICT_PACK placement)."""

    sequence: int = Field(1, ge=1, le=64, description="Ulysses sequence-parallel degree (video tokens split N ways).")
    tensor: int = Field(1, ge=1, le=64, description="Tensor-parallel degree (weights split M ways).")
    cpus_per_rank: float = Field(0.25, ge=0, description="CPUs reserved per rank worker.")
    timeout_s: float = Field(
        120.0, gt=0, description="Collective timeout: a rank stuck this long fails the job instead of hanging."
    )
    setup_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Bound on starting the ranks (actor start, process-group join, loading and sharding the model); "
        "None = auto: 120 s + 10 s per GiB of the weights the pool's sampler loads.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> "ParallelConfig":
        if self.sequence > 1 and self.tensor > 1:
            raise ValueError(
                f"parallel: sequence ({self.sequence}) and tensor ({self.tensor}) cannot both be > 1 yet "
                "(that needs a 2-D device mesh); pick one"
            )
        return self

    @property
    def degree(self) -> int:
        return self.sequence * self.tensor


class DenoiserConfig(DeploymentConfig):
    """A denoiser deployment: resources, scaling and its parallel degree. With a degree > 1 the replica itself
    holds no GPU and reserves one bundle of one GPU per rank (on CPU only when `num_gpus` > 0: see
    `AppConfig.ranks_hold_gpus`)."""

    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Ranks per replica.")


class RoutingConfig(_Strict):
    """Per-device budget the router checks a request's token count against (see `imagine.parallel.routing`)."""

    device_memory_gib: float = Field(80.0, gt=0, description="Memory of one device.")
    reserve_gib: float = Field(4.0, ge=0, description="Memory kept free per device (context, allocator, latents).")
    peak_tflops: float = Field(989.0, gt=0, description="Device peak bf16 TFLOP/s (H100 SXM: 989).")
    mfu: float = Field(0.4, gt=0, le=1, description="Assumed model FLOPs utilisation.")
    link_gbps: float = Field(300.0, gt=0, description="Intra-node link GB/s per direction (all-to-all cost).")
    max_denoise_s: float | None = Field(
        None, gt=0, description="Latency budget of one sampling loop; None = route on memory alone."
    )


class TilingConfig(BaseModel):
    """Tile sizes for `DecoderStage`'s video decode. Tiling is used only for a clip larger than one tile, so clips up
    to `tile_size_px` square and `tile_frames / 8` latent frames long (`tile_frames - 7` frames: 57 by default)
    decode in one piece, exactly as untiled; a larger one is tiled in every dimension where it exceeds the tile.

    Sizes are in output pixels / frames and must be multiples of the VAE's compression (32 px, 8 frames for LTX-2);
    the stage checks that against its VAE. A temporal tile of `tile_frames / 8` latent frames decodes to
    `tile_frames - 7` frames. Consecutive tiles share an overlap in which they are linearly cross-faded, hiding the
    seams of decoders whose receptive field is wider than the overlap (every real one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_size_px: int = Field(512, ge=1, description="Height and width of a spatial tile in output pixels.")
    tile_overlap_px: int = Field(
        64, ge=0, description="Pixels shared (cross-faded) by neighbouring spatial tiles; 0 gives hard seams."
    )
    tile_frames: int = Field(64, ge=1, description="Length of a temporal tile in output frames.")
    tile_overlap_frames: int = Field(
        24,
        ge=1,
        description="Frames shared by consecutive temporal tiles; at least one latent frame (8), since a tile's first "
        "latent frame decodes to a single frame. The cross-fade spans this minus 7 frames.",
    )

    @model_validator(mode="after")
    def _check_overlaps(self) -> TilingConfig:
        if self.tile_overlap_px >= self.tile_size_px:
            raise ValueError(
                f"tile_overlap_px ({self.tile_overlap_px}) must be smaller than tile_size_px ({self.tile_size_px})"
            )
        if self.tile_overlap_frames >= self.tile_frames:
            raise ValueError(
                f"tile_overlap_frames ({self.tile_overlap_frames}) must be smaller than tile_frames ({self.tile_frames})"
            )
        return self

    def latent_tiles(self, spatial_ratio: int, temporal_ratio: int) -> tuple[int, int, int, int]:
        """(spatial tile, spatial overlap, temporal tile, temporal overlap) in latent units for a VAE with these
        compression ratios; raise naming the field that is not a multiple of its ratio."""
        fields = (
            ("tile_size_px", spatial_ratio),
            ("tile_overlap_px", spatial_ratio),
            ("tile_frames", temporal_ratio),
            ("tile_overlap_frames", temporal_ratio),
        )
        for name, ratio in fields:
            if getattr(self, name) % ratio:
                raise ValueError(f"tiling.{name} must be a multiple of {ratio} for this VAE, got {getattr(self, name)}")
        return tuple(getattr(self, name) // ratio for name, ratio in fields)  # type: ignore[return-value]


class EditConfig(_Strict):
    """Instruction editing of videos: the masked video diffusion model, grounding and input limits."""

    enabled: bool = Field(True, description="Serve `POST /v1/videos/edits` (loads the edit and grounding models).")
    preset: str = Field("tiny-vace", description="Masked video diffusion preset (family wan_vace).")
    source: str | None = Field(None, description="Override of the edit preset's weight location.")
    grounding_preset: str = Field(
        "tiny-grounding",
        description="Grounding preset (family grounding): the GroundingDINO detector + SAM2 video segmenter that find "
        "what an instruction names.",
    )
    grounding_source: str | None = Field(
        None, description="Override of the grounding preset's weight location (a local directory or s3:// URI)."
    )
    max_source_s: float = Field(8.7, gt=0, le=120, description="Longest source video an edit accepts.")
    max_source_bytes: int = Field(64 * 1024 * 1024, ge=1, description="Largest uploaded source video.")
    max_source_pixels: int = Field(1280 * 720, ge=1, description="Largest source frame (width x height).")
    max_source_fps: float = Field(120.0, gt=0, le=1000, description="Highest frame rate of a source video.")
    max_source_frames: int | None = Field(
        None, ge=1, description="Most frames of a source video (an upload's are counted up to this, then refused); "
        "None: max_source_s x max_source_fps."
    )
    max_mask_boxes: int = Field(
        4096, ge=1, le=1_000_000, description="Most boxes of an explicit mask (`mask.boxes`, or all of `mask.frames`)."
    )
    default_steps: int = Field(20, ge=1, le=200, description="Denoising steps of an edit when the request gives none.")
    guidance_scale: float = Field(5.0, ge=1.0, le=20.0, description="CFG scale of the inpainting model.")
    dilate_px: int = Field(8, ge=0, le=256, description="Masks grow by this many pixels before repainting.")
    feather_px: int = Field(
        4, ge=0, le=128, description="The repaint blends into the source over this many pixels of the dilation margin "
        "(capped at dilate_px // 2, so masked pixels keep full weight); 0 gives a hard edge."
    )
    max_work_pixels: int | None = Field(
        832 * 480, ge=1, description="The inpainting model runs at most at this area (Wan 2.1 VACE is trained at "
        "832x480); larger sources are repainted at this area and upscaled into the mask. None: the source's size."
    )
    mp4_crf: int = Field(
        8, ge=0, le=51, description="x264 CRF of edit outputs: low, so unedited pixels survive re-encoding."
    )

    @model_validator(mode="after")
    def _check_feather(self) -> "EditConfig":
        if self.feather_px > self.dilate_px // 2:
            raise ValueError(
                f"edit.feather_px ({self.feather_px}) must be at most dilate_px // 2 ({self.dilate_px // 2}), so "
                "masked pixels keep full repaint weight"
            )
        return self


class S3Config(_Strict):
    """The S3 artifact store (`artifacts: s3://bucket/prefix`). Credentials come from boto3's standard chain
    (environment, shared config, instance or pod identity), never from this file."""

    endpoint_url: str | None = Field(None, description="An S3-compatible server's endpoint (None = AWS).")
    region: str | None = Field(None, description="The bucket's region (None = boto3's default chain).")
    multipart_threshold_mib: int = Field(
        64, ge=5, le=5 * 1024, description="Files larger than this go up as a parallel multipart upload (in parts of "
        "this size; S3's smallest part is 5 MiB)."
    )
    presigned_url_ttl_s: int = Field(
        3600, ge=60, le=7 * 24 * 3600, description="Lifetime of a done job's presigned `video.url` (at most 7 days, "
        "SigV4's limit)."
    )


class RetentionConfig(_Strict):
    """How long artifacts live. A job's inputs, checkpoint and work files are deleted once it ends (done, failed,
    cancelled or expired: the sweeper finds every ended job, whoever ended it); its output video is deleted
    `outputs_ttl_s` after it is done, after which its content answers 410 (the job row stays)."""

    outputs_ttl_s: float | None = Field(
        7 * 86_400, gt=0, description="Seconds a done job's video is kept (default 7 days); null: kept forever."
    )
    sweep_interval_s: float = Field(
        60.0, gt=0, le=86_400, description="How often the scheduler deletes ended jobs' inputs and expired outputs."
    )
    sweep_batch: int = Field(500, ge=1, le=10_000, description="Jobs swept per batch (a backlog takes several).")


class LimitsConfig(_Strict):
    """Input limits enforced by the API (4xx past them)."""

    max_prompt_chars: int = Field(4000, ge=1, description="Longest accepted prompt / negative prompt.")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="Largest decoded image_url payload.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest accepted image (width x height).")
    max_request_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="Largest accepted request body (bytes read, chunked or not) of every "
        "route but `POST /v1/videos/edits`."
    )
    max_edit_request_bytes: int | None = Field(
        None, ge=1, description="Largest accepted body of `POST /v1/videos/edits`; None: room for a source and a mask "
        "video of `edit.max_source_bytes` each as base64 data URIs, plus `max_request_bytes` for the rest."
    )
    max_event_streams_per_key: int = Field(
        16, ge=1, le=10_000, description="Event streams (`/v1/videos/{id}/events`) one API key (with auth off: the "
        "tenant) may hold open on one ingress replica; past it 429 + Retry-After."
    )
    event_stream_idle_s: float = Field(
        900.0, gt=0, le=86_400, description="An event stream whose job has not changed for this long ends (the "
        "client reconnects to go on)."
    )
    event_stream_max_s: float = Field(
        3600.0, gt=0, le=86_400, description="Longest life of an event stream: its `timeout` parameter is capped at "
        "this."
    )
    event_stream_max_poll_s: float = Field(
        1.0, gt=0, le=60, description="While a watched job does not change, the interval at which its one shared "
        "poll re-reads it doubles from `events_interval_s` up to this."
    )


EDIT_POOL = "editor"  # the denoiser pool of edit jobs (its preset is `edit.preset`)
# deployments that load a model besides the denoiser pools, and those that never do (AppConfig field names)
MODEL_STAGES = ("text_encoder", "decoder", "grounder", "edit_codec")
CONTROL_DEPLOYMENTS = ("ingress", "scheduler")

TIERS = ("realtime", "standard", "batch")  # strict priority order, highest first
Tier = Literal["realtime", "standard", "batch"]


class KeyLimits(_Strict):
    """Admission limits of one API key (None = unlimited). Past a limit: 429 + Retry-After."""

    max_concurrent_jobs: int | None = Field(None, ge=1, description="Jobs of this key in flight (queued or running).")
    max_queued_jobs: int | None = Field(None, ge=1, description="Jobs of this key waiting in the queue.")
    max_video_seconds_per_day: float | None = Field(
        None, gt=0, description="Output seconds this key may request per UTC day (failed/expired jobs excluded)."
    )


class AuthConfig(_Strict):
    """API keys and tenants. Off only for a localhost development server (`imagine up`)."""

    enabled: bool = Field(True, description="Require `Authorization: Bearer <key>` on every /v1 route.")
    default_limits: KeyLimits = Field(default_factory=KeyLimits, description="Limits of keys created without their own.")
    idempotency_ttl_s: float = Field(86_400, gt=0, description="How long an Idempotency-Key is remembered.")


class MetricsConfig(_Strict):
    """Who may scrape `GET /metrics` (totals across all tenants). With a token, a scrape must send
    `Authorization: Bearer <token>`; without one, /metrics is open when auth is off and off (404) when auth is on."""

    enabled: bool = Field(True, description="Serve `GET /metrics` at all (false: 404).")
    token: SecretStr | None = Field(
        None, min_length=16, description=f"Bearer token a scrape must present (at least 16 characters); None = "
        f"`${METRICS_TOKEN_ENV}` (read in each replica, so it can come from a Kubernetes Secret), else no token."
    )

    def resolved_token(self) -> str | None:
        """The scrape token: `token`, else `$IMAGINE_METRICS_TOKEN` (at least 16 characters), else None."""
        if self.token is not None:
            return self.token.get_secret_value()
        from_env = os.environ.get(METRICS_TOKEN_ENV) or None
        if from_env is not None and len(from_env) < 16:
            raise ValueError(f"${METRICS_TOKEN_ENV} must have at least 16 characters, got {len(from_env)}")
        return from_env


class SchedulingConfig(_Strict):
    """Who runs next: strict tiers with aging, weighted fair share between tenants inside a tier."""

    aging_s: float = Field(
        300.0, gt=0, description="A queued job is promoted one tier for every `aging_s` seconds it has waited."
    )
    tenant_weights: dict[str, float] = Field(
        default_factory=dict, description="Fair-share weight per tenant inside a tier (default 1.0)."
    )
    max_queued_per_tier: dict[Tier, int] = Field(
        default_factory=lambda: {"realtime": 1000, "standard": 10_000, "batch": 100_000},
        description="Bound on each tier's queue; past it new jobs get 429.",
    )
    preemption: bool = Field(True, description="Pause lower-tier denoising at a step boundary for waiting higher tiers.")
    paused: bool = Field(False, description="Accept and queue jobs but start none (maintenance, load tests).")
    max_preemptions_per_job: int = Field(2, ge=0, le=100, description="A job is never paused more often than this.")
    max_attempts: int = Field(
        3, ge=1, le=100, description="Dispatches of a job whose replica (or a rank of it, or its node) died under it before the job is failed."
    )


class AccountingConfig(_Strict):
    """Cost (what a job cost us: device-seconds x $/device-hour) and price (what we charge: output seconds x list)."""

    device_hour_usd: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.10, "cuda": 2.50},
        description="$ per device-hour by device type (the device string's kind: cpu, cuda, ...).",
    )
    price_per_second_usd: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "tiny": {"480p": 0.0, "720p": 0.0},
            "ltx-2": {"480p": 0.05, "720p": 0.10},
            "tiny-vace": {"480p": 0.0, "720p": 0.0},
            "wan-vace": {"480p": 0.04, "720p": 0.08},
        },
        description="Price per output second (audio included) by model and resolution.",
    )


class ControlDeploymentConfig(DeploymentConfig):
    """A deployment that runs no model (the ingress, the scheduler): it reserves no GPU unless told to."""

    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica (it runs no model: none by default).")


def _ingress_default() -> ControlDeploymentConfig:
    return ControlDeploymentConfig(num_cpus=0.1, num_gpus=0.0, max_ongoing_requests=256)


def _scheduler_default() -> ControlDeploymentConfig:
    return ControlDeploymentConfig(num_cpus=0.05, num_gpus=0.0, max_ongoing_requests=1000)


def _stage_default() -> DeploymentConfig:
    # a stage replica runs one request at a time on its torch thread; more would only queue inside it
    return DeploymentConfig(num_cpus=0.25, max_ongoing_requests=1)


# model names of the hosted APIs -> the served default (requests written from their docs run unchanged)
MODEL_ALIASES = {"grok-imagine-video": "default", "sora-2": "default", "sora-2-pro": "default"}


class RemoteMediaConfig(_Strict):
    """`https://` media inputs (image_url / image, video_url / video, mask.video_url), fetched once by the API with
    every resolved address checked (`imagine.api.fetch`)."""

    enabled: bool = Field(True, description="Fetch http(s) URLs at all (off: data URIs only).")
    allow_http: bool = Field(False, description="Also plain http:// (https only by default).")
    allow_hosts: list[str] = Field(
        default_factory=list, description="Host names or IPs fetched without the address policy (exact, case-"
        "insensitive): for tests and private media servers. Such a host may resolve to a private address.",
    )
    max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed, each re-checked.")
    connect_timeout_s: float = Field(5.0, gt=0, le=60, description="Per connection attempt.")
    total_timeout_s: float = Field(30.0, gt=0, le=600, description="The whole fetch: redirects and body included.")
    user_agent: str = Field("imagine-media-fetcher/1", description="User-Agent of the fetcher.")


class AppConfig(_Strict):
    """Everything `build_app` needs: state locations, the model, and per-deployment options."""

    home: Path = Field(default_factory=default_home, description="Cache, SQLite and local artifact root.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the job store; None = `$IMAGINE_DATABASE_URL` (read in each replica, so a "
        "password can come from the environment, e.g. a Kubernetes Secret, not from the config), else the SQLite "
        "file `<home>/imagine.db`.",
    )
    migrate_on_start: bool = Field(
        True,
        description="Each replica migrates the job store to its schema at start (under a lock, so racing replicas "
        "are safe); off: replicas only check it and refuse an outdated one (run `imagine db upgrade` first). A "
        "replica always refuses a schema newer than it knows.",
    )
    artifacts: str | None = Field(
        None,
        description="Where inputs, outputs and checkpoints live: a local directory, or `s3://bucket/prefix` (see "
        "`s3`); None = `<home>/artifacts`.",
    )
    s3: S3Config = Field(default_factory=lambda: S3Config(), description="The S3 artifact store's client options.")
    retention: RetentionConfig = Field(
        default_factory=lambda: RetentionConfig(), description="How long outputs, inputs and checkpoints are kept."
    )
    public_url: str | None = Field(
        None, description="Base URL clients reach the API at, used for `video.url` (None = from the request)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The generation model.")
    model_aliases: dict[str, str] = Field(
        default_factory=lambda: dict(MODEL_ALIASES),
        description="Model names clients send -> the preset they get ('default': the route's default model), so a "
        "request written for xAI (`grok-imagine-video`) or OpenAI (`sora-2`) runs on the served model.",
    )
    remote_media: RemoteMediaConfig = Field(
        default_factory=lambda: RemoteMediaConfig(), description="Fetching https:// media inputs (images, videos)."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, tenants, idempotency.")
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig, description="Priority and fairness.")
    accounting: AccountingConfig = Field(default_factory=AccountingConfig, description="Cost and price.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="API input limits.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Access to `GET /metrics`.")
    max_inflight_jobs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Fixed number of jobs the scheduler lets the `denoiser` pool run at once; None = its RUNNING "
        "replicas x max_ongoing_requests, as Serve reports them.",
    )
    poll_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often the scheduler looks for queued jobs without a nudge."
    )
    events_interval_s: float = Field(
        0.05, gt=0, le=10, description="How often an SSE stream (`/v1/videos/{id}/events`) re-reads its job."
    )
    progress_every_steps: int = Field(1, ge=1, description="Write job progress every N denoising steps.")
    mp4_crf: int = Field(18, ge=0, le=51, description="x264 CRF of the output MP4 (lower = better).")
    mp4_preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"] = (
        Field("veryfast", description="x264 preset of the output MP4 (encode speed vs size).")
    )
    ingress: ControlDeploymentConfig = Field(default_factory=_ingress_default, description="HTTP ingress.")
    scheduler: ControlDeploymentConfig = Field(default_factory=_scheduler_default, description="Job dispatcher.")
    text_encoder: DeploymentConfig = Field(default_factory=_stage_default, description="Prompt encoder.")
    denoiser: DenoiserConfig = Field(default_factory=lambda: DenoiserConfig(**_stage_default().model_dump()),
                                     description="Sampling loop (the default pool, `denoiser`).")
    denoiser_variants: dict[str, DenoiserConfig] = Field(
        default_factory=dict,
        description="More denoiser deployments of other parallel degrees, by pool name (e.g. `sp4`); each request "
        "goes to the smallest one that fits (`routing`).",
    )
    routing: RoutingConfig = Field(default_factory=RoutingConfig, description="Budget for routing long clips.")
    decoder: DeploymentConfig = Field(default_factory=_stage_default, description="VAE decode + mux + store.")
    decode_tiling: TilingConfig | None = Field(
        default_factory=TilingConfig,
        description="Decode clips larger than one tile in overlapping tiles (bounded decoder memory); null: always "
        "decode the whole clip at once.",
    )
    edit: EditConfig = Field(default_factory=EditConfig, description="Instruction editing.")
    grounder: DeploymentConfig = Field(default_factory=_stage_default, description="Detector + SAM2 video masks.")
    edit_codec: DeploymentConfig = Field(
        default_factory=_stage_default,
        description="Edit conditioning and output: prompt + masked-source VAE encode, VAE decode + composite + mux.",
    )
    editor: DenoiserConfig = Field(
        default_factory=lambda: DenoiserConfig(**_stage_default().model_dump()),
        description="The edit pool: a denoiser pool whose model is `edit.preset` (Wan VACE), with its own parallel "
        "degree; preempted, checkpointed and retried like the generation pools.",
    )

    @field_validator("home", mode="before")
    @classmethod
    def _home_is_a_directory(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            raise ValueError(f"home must be a local directory, got the URI {value!r}")
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("artifacts")
    @classmethod
    def _check_artifacts(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if value.startswith("s3://"):
            from imagine.storage.s3 import parse_s3_uri  # here, not at the top: config stays a leaf module

            parse_s3_uri(value)
            return value
        if "://" in value:
            raise ValueError(
                f"artifacts must be a local directory or s3://bucket/prefix, got the URI {value!r} "
                f"(scheme {value.split('://')[0]!r} is not supported)"
            )
        return str(Path(value).expanduser())

    @field_validator("denoiser_variants")
    @classmethod
    def _check_variants(cls, value: dict[str, DenoiserConfig]) -> dict[str, DenoiserConfig]:
        for name in value:
            if name in ("denoiser", "editor") or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(
                    f"denoiser_variants: pool name {name!r} must be alphanumeric (with - or _) and not "
                    "'denoiser' or 'editor'"
                )
        return value

    def denoiser_pools(self) -> dict[str, DenoiserConfig]:
        """Every denoiser deployment by pool name, the default `denoiser` first."""
        return {"denoiser": self.denoiser, **self.denoiser_variants}

    def sampler_pools(self) -> dict[str, DenoiserConfig]:
        """Every denoiser pool by name: the generation pools, then `editor` (edits) when edits are on."""
        pools = self.denoiser_pools()
        if self.edit.enabled:
            pools[EDIT_POOL] = self.editor
        return pools

    def _deployment(self, name: str) -> tuple[DeploymentConfig, bool]:
        """(config block, whether it runs a model) of deployment `name`: a field or a denoiser pool name."""
        pools = {**self.denoiser_pools(), EDIT_POOL: self.editor}
        if name in pools:
            return pools[name], True
        if name in MODEL_STAGES:
            return getattr(self, name), True
        if name in CONTROL_DEPLOYMENTS:
            return getattr(self, name), False
        raise ValueError(
            f"no deployment {name!r}; deployments: {[*CONTROL_DEPLOYMENTS, *MODEL_STAGES, *pools]}"
        )

    def stage_gpus(self, name: str) -> float:
        """GPUs one replica of deployment `name` reserves, auto `num_gpus` resolved (see `DeploymentConfig.gpus`)."""
        block, runs_model = self._deployment(name)
        return block.gpus(runs_model, self.model.on_cuda)

    def stage_options(self, name: str) -> dict[str, Any]:
        """Serve options of deployment `name` (`ingress`, `scheduler`, a model stage or a denoiser pool), auto
        `num_gpus` resolved. A parallel pool's replica is laid out further by `imagine.serving.app.denoiser_options`."""
        block, runs_model = self._deployment(name)
        return block.serve_options(runs_model, self.model.on_cuda)

    def ranks_hold_gpus(self, pool: str) -> bool:
        """Whether each rank of parallel pool `pool` reserves a GPU: always on CUDA (Ray gives each rank its own
        card); on CPU when the pool's `num_gpus` is set above 0 (CPU clusters and tests modelling GPU nodes)."""
        return self.model.on_cuda or self.stage_gpus(pool) > 0

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or os.environ.get(DATABASE_URL_ENV) or self.sqlite_default_url

    @property
    def sqlite_default_url(self) -> str:
        """The embedded default job store: the SQLite file `<home>/imagine.db`."""
        return f"sqlite:///{self.home / 'imagine.db'}"

    @property
    def resolved_artifacts(self) -> str:
        """The artifact location: `artifacts`, or the local directory `<home>/artifacts`."""
        return self.artifacts or str(self.home / "artifacts")

    @property
    def artifacts_on_s3(self) -> bool:
        return self.resolved_artifacts.startswith("s3://")

    @property
    def resolved_artifacts_dir(self) -> Path:
        """The local artifact directory (a ValueError when artifacts are on S3: there is no local directory)."""
        if self.artifacts_on_s3:
            raise ValueError(f"artifacts are at {self.resolved_artifacts}, not in a local directory")
        return Path(self.resolved_artifacts)
