"""The routing rule and its memory/latency model (pure Python)."""

import math

import pytest

from imagine.models.ltx2 import ltx2_transformer_dims
from imagine.models.tiny import TRANSFORMER_CONFIG
from imagine.parallel.routing import (
    Budget,
    Candidate,
    NoFittingDenoiser,
    Router,
    estimate,
    ulysses_bytes_per_device,
)
from imagine.pipeline.sizing import plan_video

LTX2 = ltx2_transformer_dims({})  # diffusers' defaults are the full-size LTX-2 transformer
GIB = 2**30


def _clip(seconds: float, resolution: str) -> tuple[int, int, int, float]:
    plan = plan_video(duration_s=seconds, resolution=resolution, aspect_ratio="16:9", fps=24)
    return plan.num_frames, plan.height, plan.width, plan.duration_s


def test_full_size_dims_match_ltx2_scale():
    assert LTX2.hidden == 4096 and LTX2.audio_hidden == 2048 and LTX2.num_layers == 48
    assert 15e9 < LTX2.params < 22e9  # LTX-2's video+audio transformer is ~19B parameters
    assert LTX2.audio_tokens_per_s == 25.0


def test_token_counts_grow_with_duration_and_resolution():
    v5, a5 = LTX2.tokens(*_clip(5, "480p"))
    v15, a15 = LTX2.tokens(*_clip(15, "720p"))
    # 5 s 480p: 121 frames (5.04 s) -> 16 latent frames of 27x15 tokens, 25 audio tokens per second
    assert (v5, a5) == (16 * 27 * 15, round(121 / 24 * 25))
    assert v15 > 6 * v5 and a15 == round(_clip(15, "720p")[3] * 25)


def test_memory_model_terms():
    b = Budget(device_memory_bytes=80 * GIB, reserve_bytes=0)
    one = estimate(LTX2, 10_000, 0, Candidate("a", 1, 1), b)
    sp2 = estimate(LTX2, 10_000, 0, Candidate("b", 2, 1), b)
    tp2 = estimate(LTX2, 10_000, 0, Candidate("c", 1, 2), b)
    weights = LTX2.params * 2
    acts_one = one.memory_bytes - weights
    assert acts_one == pytest.approx(2 * 2 * (6 + 2 * 4) * 10_000 * 4096)
    assert sp2.memory_bytes == pytest.approx(weights + acts_one / 2)  # SP halves activations, not weights
    assert tp2.memory_bytes < weights / 2 + acts_one  # TP halves weights
    assert one.step_s > sp2.step_s > one.step_s / 2  # SP halves compute but pays all-to-alls


def test_ulysses_volume():
    assert ulysses_bytes_per_device(LTX2, 1000, 1) == 0
    # 2 ranks: each sends half of its 500-token shard, 4 times per layer, CFG batch 2, bf16
    assert ulysses_bytes_per_device(LTX2, 1000, 2) == 4 * 48 * 500 * 4096 * 2 * 2 / 2


@pytest.fixture
def router() -> Router:
    budget = Budget(device_memory_bytes=80 * GIB, max_denoise_s=300, steps=40)
    return Router(LTX2, [Candidate("sp4", 4), Candidate("denoiser", 1), Candidate("sp2", 2)], budget)


def test_routes_to_smallest_degree_that_fits(router: Router):
    assert router.route(*_clip(5, "480p")) == "denoiser"
    assert router.route(*_clip(5, "720p")) == "denoiser"
    # 15 s 720p is ~40k tokens: fits 80 GiB on one device but misses the 300 s budget there
    est = {e.pool: e for e in router.estimates(*_clip(15, "720p"))}
    assert est["denoiser"].fits_memory and not est["denoiser"].fits_latency
    assert router.route(*_clip(15, "720p")) == next(p for p in ("sp2", "sp4") if est[p].fits)


def test_memory_decides_without_latency_budget():
    small = Router(LTX2, [Candidate("denoiser"), Candidate("sp2", 2)], Budget(device_memory_bytes=45 * GIB))
    assert small.route(*_clip(2, "480p")) == "denoiser"
    # a long 720p clip's activations push one 45 GiB device over: SP2 halves them
    frames, h, w, d = _clip(15, "720p")
    est = {e.pool: e for e in small.estimates(frames, h, w, d)}
    assert not est["denoiser"].fits_memory and est["sp2"].fits_memory
    assert small.route(frames, h, w, d) == "sp2"


def test_nothing_fits_names_the_need():
    router = Router(LTX2, [Candidate("denoiser")], Budget(device_memory_bytes=24 * GIB))
    with pytest.raises(NoFittingDenoiser, match=r"GiB per device.*'denoiser'"):
        router.route(*_clip(5, "480p"))  # 19B bf16 weights alone are ~35 GiB


def test_tiny_model_always_fits_one_device():
    dims = ltx2_transformer_dims(TRANSFORMER_CONFIG)
    router = Router(dims, [Candidate("denoiser"), Candidate("sp2", 2)], Budget(device_memory_bytes=1 * GIB, reserve_bytes=0))
    assert router.route(*_clip(15, "720p")) == "denoiser"
    assert math.isclose(dims.audio_tokens_per_s, 25.0)
