"""Denoiser autoscaling on real demand. The scheduler dispatches only as many jobs as the denoisers
can start now, so Serve's own request counts never see the queue; instead each denoiser replica
exports the job store's queue depth (`record_autoscaling_stats`) and this policy sizes the
deployment to `ceil((queued + denoising) / jobs_per_replica)` within min/max; Serve applies the
configured up/down delays."""

from __future__ import annotations

import math
from typing import Any

from ray.serve.config import AutoscalingContext

POLICY_PATH = "imagine.serving.autoscaling:queue_depth_policy"


def desired_replicas(queued: float, denoising: float, jobs_per_replica: float, lo: int, hi: int) -> int:
    """Replicas needed to start every queued job now, clamped to [lo, hi]."""
    if jobs_per_replica <= 0:
        raise ValueError(f"jobs_per_replica must be > 0, got {jobs_per_replica}")
    want = math.ceil((max(0.0, queued) + max(0.0, denoising)) / jobs_per_replica)
    return max(lo, min(hi, want))


def queue_depth_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    metrics = ctx.aggregated_metrics or {}
    # every replica reads the same store: take the freshest (max) view of the queue
    queued = max(metrics.get("queued_jobs", {}).values(), default=0.0)
    denoising = sum(metrics.get("denoising", {}).values())
    config = ctx.config
    per_replica = float(getattr(config, "target_ongoing_requests", 1) or 1)
    want = desired_replicas(
        queued, denoising, per_replica, ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    )
    # Serve applies upscale_delay_s / downscale_delay_s to a custom policy's decisions itself
    # (it keeps its own decision counters in the policy state): answer the wanted size every time.
    return want, {}
