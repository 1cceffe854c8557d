"""Which denoiser deployment a request goes to: the smallest parallel degree whose per-device memory and
latency fit the request's token count.

Token count grows with duration x resolution (LTX-2: one video token per 32x32 pixels of every 8th frame,
plus 25 audio tokens per second), so a 15 s 720p clip is ~9x the tokens of a 5 s 480p one, and attention is
quadratic in it. Operators declare denoiser deployments of several degrees (say `denoiser` = 1 GPU and
`sp4` = 4 GPUs of one node); `Router.route` picks for each request the cheapest one that fits.

The memory model (bytes on ONE device of a replica with sequence degree `sp` and tensor degree `tp`):

    weights     = params x bytes_per_param / tp                      (SP replicates weights; TP shards them)
    activations = cfg x ceil(video_tokens / sp) x hidden x bytes x act_factor
                + cfg x audio_tokens x audio_hidden x bytes x act_factor   (audio tokens are replicated)
    need        = weights + activations + reserve_bytes              (CUDA context, allocator slack, latents)
    fits        = need <= device_memory_bytes

`act_factor` counts the per-token buffers alive inside one transformer block at its peak (input, norm output,
q/k/v, attention output: 6; the FFN's expanded hidden in and out: 2 x ffn_mult). Inference keeps no activations
across blocks, and attention is assumed flash/memory-efficient (O(tokens), not O(tokens^2)).

The latency model (one denoising step, seconds):

    flops  = cfg x (2 x dense_params x tokens + 4 x layers x video_tokens^2 x hidden)
    step_s = flops / (sp x tp x peak_flops x mfu) + ulysses_bytes(sp) / link_bytes_per_s
    fits   = steps x step_s <= max_denoise_s  (when a budget is configured)

Ulysses moves 4 all-to-alls (q, k, v in; output back) per attention layer, each sending (sp-1)/sp of the
rank's shard: `4 x layers x cfg x video_tokens x hidden x bytes x (sp-1)/sp / sp` per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerDims:
    """What the cost models need to know about a denoiser transformer (no weights). Each model's module in
    `imagine.models` builds it from that model's config."""

    num_layers: int
    hidden: int  # video stream width (heads x head_dim)
    audio_hidden: int
    ffn_mult: float
    params: int  # all transformer parameters
    spatial_ratio: int = 32  # pixels per latent token side (VAE x patch)
    temporal_ratio: int = 8  # frames per latent frame
    audio_tokens_per_s: float = 25.0  # audio latent frames per second

    def tokens(self, num_frames: int, height: int, width: int, duration_s: float) -> tuple[int, int]:
        """(video tokens, audio tokens) of one clip."""
        latent_frames = (num_frames - 1) // self.temporal_ratio + 1
        video = latent_frames * math.ceil(height / self.spatial_ratio) * math.ceil(width / self.spatial_ratio)
        return video, round(duration_s * self.audio_tokens_per_s)


@dataclass(frozen=True)
class Budget:
    """Per-device limits and the device's speed, from `RoutingConfig`."""

    device_memory_bytes: float
    reserve_bytes: float = 4 * 2**30
    bytes_per_param: int = 2  # bf16 weights
    bytes_per_activation: int = 2
    cfg: int = 2  # classifier-free guidance doubles the batch
    peak_flops: float = 989e12  # H100 SXM dense bf16
    mfu: float = 0.4
    link_bytes_per_s: float = 300e9  # NVLink-class, per direction
    max_denoise_s: float | None = None  # latency budget of a whole sampling loop (None: memory decides alone)
    steps: int = 40


@dataclass(frozen=True)
class Candidate:
    """One denoiser deployment the router may choose."""

    pool: str  # dispatcher pool / deployment key
    sequence: int = 1
    tensor: int = 1

    @property
    def devices(self) -> int:
        return self.sequence * self.tensor


@dataclass(frozen=True)
class Estimate:
    pool: str
    devices: int
    memory_bytes: float
    step_s: float
    fits_memory: bool
    fits_latency: bool

    @property
    def fits(self) -> bool:
        return self.fits_memory and self.fits_latency


def estimate(dims: TransformerDims, video_tokens: int, audio_tokens: int, c: Candidate, b: Budget) -> Estimate:
    """Memory and step time of one request on one candidate (the formulas in the module docstring)."""
    act_factor = 6 + 2 * dims.ffn_mult
    weights = dims.params * b.bytes_per_param / c.tensor
    local_video = math.ceil(video_tokens / c.sequence)
    # TP splits the inner buffers (q, k, v, attention output, FFN hidden) but not the 2 stream-width ones
    inner = (act_factor - 2) / c.tensor + 2
    acts = b.cfg * b.bytes_per_activation * inner * (local_video * dims.hidden + audio_tokens * dims.audio_hidden)
    memory = weights + acts + b.reserve_bytes
    tokens = video_tokens + audio_tokens
    flops = b.cfg * (2 * dims.params * tokens + 4 * dims.num_layers * video_tokens**2 * dims.hidden)
    comm = ulysses_bytes_per_device(dims, video_tokens, c.sequence, b.cfg, b.bytes_per_activation)
    step_s = flops / (c.devices * b.peak_flops * b.mfu) + comm / b.link_bytes_per_s
    fits_latency = b.max_denoise_s is None or step_s * b.steps <= b.max_denoise_s
    return Estimate(c.pool, c.devices, memory, step_s, memory <= b.device_memory_bytes, fits_latency)


def ulysses_bytes_per_device(dims: TransformerDims, video_tokens: int, sp: int, cfg: int = 2, nbytes: int = 2) -> float:
    """Bytes one rank sends per denoising step in Ulysses all-to-alls (q, k, v and the output, every layer)."""
    if sp <= 1:
        return 0.0
    shard = math.ceil(video_tokens / sp) * dims.hidden * nbytes * cfg
    return 4 * dims.num_layers * shard * (sp - 1) / sp


class NoFittingDenoiser(ValueError):
    """No configured denoiser deployment fits a request; the API answers 413 with this message."""


class Router:
    """Routes requests to the smallest-degree candidate that fits (ties: fewer devices, then declaration order)."""

    def __init__(self, dims: TransformerDims, candidates: list[Candidate], budget: Budget):
        if not candidates:
            raise ValueError("candidates: at least one denoiser deployment is needed")
        self.dims = dims
        self.budget = budget
        self.candidates = sorted(candidates, key=lambda c: c.devices)  # stable: declaration order breaks ties

    def estimates(self, num_frames: int, height: int, width: int, duration_s: float) -> list[Estimate]:
        video, audio = self.dims.tokens(num_frames, height, width, duration_s)
        return [estimate(self.dims, video, audio, c, self.budget) for c in self.candidates]

    def route(self, num_frames: int, height: int, width: int, duration_s: float) -> str:
        """The pool of the smallest candidate that fits; `NoFittingDenoiser` naming the need when none does."""
        estimates = self.estimates(num_frames, height, width, duration_s)
        for e in estimates:
            if e.fits:
                return e.pool
        video, audio = self.dims.tokens(num_frames, height, width, duration_s)
        largest = estimates[-1]
        why = []
        if not largest.fits_memory:
            why.append(
                f"needs {largest.memory_bytes / 2**30:.1f} GiB per device on the largest deployment "
                f"({largest.pool!r}, {largest.devices} devices) of {self.budget.device_memory_bytes / 2**30:.1f} GiB"
            )
        if not largest.fits_latency:
            why.append(
                f"would denoise in ~{largest.step_s * self.budget.steps:.0f} s on {largest.pool!r}, over the "
                f"{self.budget.max_denoise_s:.0f} s budget"
            )
        raise NoFittingDenoiser(
            f"{video} video + {audio} audio tokens ({width}x{height}, {num_frames} frames) fit no configured "
            f"denoiser: {'; '.join(why)}. Ask for a shorter or smaller clip."
        )
