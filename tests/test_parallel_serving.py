"""Parallel denoiser replicas on a local Ray (CPU, gloo): rank workers running `SamplerRank` give the single-rank
latents for sequence parallel (Ulysses, padded token count) and tensor parallel over the whole sampling loop; a
`parallel: {sequence: 2}` denoiser serves jobs over HTTP with the in-process output, cancels within one step on all
ranks, and a rank killed mid-job fails that attempt cleanly: the replica rebuilds its group and the job is retried."""

from __future__ import annotations

import functools
import io
import os
import signal

import psutil
import pytest
import torch
from serve_helpers import LONG, SMALL, serve_app, small_config

from imagine.config import AppConfig
from imagine.jobs import JobStore
from imagine.models.loading import load_components
from imagine.models.tiny import ensure_tiny_ltx2
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.generate import LocalGenerator
from imagine.pipeline.media import mux_mp4, read_video
from imagine.pipeline.types import GenerationSpec
from imagine.serving.ranks import RankedLoop, RankGroup
from imagine.serving.runner import LocalLoop
from imagine.serving.samplers import SamplerRank
from imagine.serving.scheduler import spec_from_job
from imagine.storage import open_artifact_store

pytestmark = pytest.mark.ray

TOLERANCE = 1e-3  # relative: max|parallel - single| / max|single|


def _config(home, parallel: dict, **extra) -> AppConfig:
    return small_config(
        home, stage_cpus=0.1, denoiser={"parallel": {"cpus_per_rank": 0.25, "timeout_s": 60, **parallel}}, **extra
    )


def _run_loop(loop, spec, embeddings):
    done, total = loop.begin(spec, embeddings, None)
    while done < total:
        done = loop.step()
    return loop.finish()


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("imagine-parallel-home")
    ensure_tiny_ltx2(home)
    return home


@pytest.mark.parametrize("parallel", [{"sequence": 2}, {"tensor": 2}], ids=["sp2", "tp2"])
def test_rank_workers_loop_equals_single_rank(home, ray_session, parallel):
    """The whole sampling loop through `RankGroup` + `SamplerRank` (what a parallel replica runs); 160x96 x 17
    frames = 3 x 3 x 5 = 45 video tokens, which 2 ranks cannot split evenly (the padded path)."""
    config = _config(home, parallel)
    components = load_components(ensure_tiny_ltx2(home), sorted(set(TextEncoderStage.components + DenoiserStage.components)))
    spec = GenerationSpec(prompt="a kettle whistling", negative_prompt="", width=160, height=96, num_frames=17,
                          num_inference_steps=3, seed=9, guidance_scale=3.0)
    embeddings = TextEncoderStage(components)(spec.prompt, spec.negative_prompt, True)
    with torch.inference_mode():
        single = _run_loop(LocalLoop(DenoiserStage(components)), spec, embeddings)
    group = RankGroup(2, functools.partial(SamplerRank, config, "denoiser"), "cpu", cpus_per_rank=0.25)
    with group:
        parallel_out = _run_loop(RankedLoop(group), spec, embeddings)
    assert _rel_err(parallel_out.video, single.video) < TOLERANCE
    assert _rel_err(parallel_out.audio, single.audio) < TOLERANCE


def test_rank_workers_edit_loop_equals_single_rank(home, ray_session):
    """The `editor` pool's sampler (Wan VACE) through `RankGroup` + `SamplerRank`, sequence parallel over 2 ranks,
    equals the single-rank loop: the same protocol and rank machinery as generation, another model."""
    from imagine.models.tiny_vace import ensure_tiny_vace
    from imagine.pipeline.vace import EDIT_COMPONENTS, EditSpec, VaceEncoderStage, VaceSampler

    config = _config(home, {}, edit={"enabled": True},
                     editor={"num_cpus": 0.1, "parallel": {"sequence": 2, "cpus_per_rank": 0.25, "timeout_s": 60}})
    components = load_components(ensure_tiny_vace(home), EDIT_COMPONENTS)
    spec = EditSpec("a blooming tree", "blurry", seed=4, num_inference_steps=3, guidance_scale=4.0)
    generator = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (9, 48, 64, 3), dtype=torch.uint8, generator=generator)
    masks = torch.zeros(9, 48, 64)
    masks[:, 10:30, 20:50] = 1.0
    conditioning = VaceEncoderStage(components, components["transformer"].config.patch_size)(frames, masks, spec)
    with torch.inference_mode():
        single = _run_loop(LocalLoop(VaceSampler(components)), spec, conditioning)
    group = RankGroup(2, functools.partial(SamplerRank, config, "editor"), "cpu", cpus_per_rank=0.25)
    with group:
        parallel_out = _run_loop(RankedLoop(group), spec, conditioning.to_cpu())
    assert _rel_err(parallel_out.latents, single.latents) < TOLERANCE


@pytest.fixture(scope="module")
def served(home, ray_session):
    with serve_app(_config(home, {"sequence": 2})) as served:
        yield served


def _rank_pids() -> list[int]:
    """Rank worker processes (Ray titles them `ray::RankWorker`, `ray::RankWorker.run` while in a call)."""
    titles = ((p.pid, (p.info["cmdline"] or [""])[0]) for p in psutil.process_iter(["cmdline"]))
    return sorted(pid for pid, title in titles if title.split(".")[0] == "ray::RankWorker")


def test_sp2_replica_serves_the_single_rank_video(served, home):
    job_id = served.submit(seed=21, **SMALL)
    job = served.wait_terminal(job_id)
    assert job["status"] == "done", job
    assert len(_rank_pids()) == 2  # one replica, two rank workers
    served_frames = read_video(served.http.get(f"/v1/videos/{job_id}/content").content).frames

    store = JobStore(served.config.resolved_database_url)
    try:  # the very spec the scheduler handed the replica
        spec = spec_from_job(store.get(job_id), open_artifact_store(served.config))
    finally:
        store.close()
    media = LocalGenerator(ensure_tiny_ltx2(home)).generate(spec)
    buf = io.BytesIO()
    mux_mp4(media, buf, crf=served.config.mp4_crf, preset=served.config.mp4_preset)
    local_frames = read_video(buf.getvalue()).frames
    assert served_frames.shape == local_frames.shape
    # x264 makes different choices for inputs a few 1e-6 apart (the noise content of random weights is its worst
    # case), so compare the decoded clips by PSNR: near-identical clips score > 35 dB, another seed's ~10 dB
    mse = (served_frames.double() - local_frames.double()).pow(2).mean()
    assert 10 * torch.log10(255.0**2 / mse) > 35.0, float(mse)


def test_cancel_under_sp_stops_all_ranks_within_one_step(served):
    job_id = served.submit(**LONG)
    served.wait_for(job_id, lambda j: j["state"] == "running" and j["progress"] > 0)
    resp = served.http.post(f"/v1/videos/{job_id}/cancel")
    assert resp.status_code == 200, resp.text
    steps = LONG["num_inference_steps"]
    at_cancel = round(resp.json()["progress"] / 0.95 * steps)
    final = served.wait_terminal(job_id, timeout=60)
    assert final["status"] == "cancelled"
    assert round(final["progress"] / 0.95 * steps) - at_cancel <= 1
    # the ranks are idle and the same: the next job runs on them at once
    pids = _rank_pids()
    after = served.submit(**SMALL)
    assert served.wait_terminal(after)["status"] == "done"
    assert _rank_pids() == pids


def test_a_killed_rank_fails_the_attempt_and_the_job_is_retried(served):
    job_id = served.submit(**{**LONG, "num_inference_steps": 40})
    served.wait_for(job_id, lambda j: j["state"] == "running" and j["progress"] > 0.1)
    victim = _rank_pids()[-1]
    os.kill(victim, signal.SIGKILL)
    final = served.wait_terminal(job_id, timeout=240)
    assert final["status"] == "done", final
    store = JobStore(served.config.resolved_database_url)
    try:
        assert store.get(job_id).attempt == 2  # the failed attempt, then the retry on a rebuilt group
    finally:
        store.close()
    pids = _rank_pids()
    assert len(pids) == 2 and victim not in pids  # the replica started a fresh group
