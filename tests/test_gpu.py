"""GPU tier (run on a lent GPU by `scripts/gpu_session.sh`; the CUDA tests skip without CUDA): the tiny denoiser on
CUDA equals the CPU loop; sequence- and tensor-parallel on ONE GPU (two ranks over gloo with CUDA tensors: NCCL
refuses two ranks on one device) equal one rank; and with 2+ GPUs and Ray, 2-rank groups over NCCL (Ray rank
actors, one GPU each) equal one GPU.

Only torch, diffusers, transformers, pydantic and deepspeed are needed here (what the device carries), except the
NCCL test, which needs Ray. The one-device gloo test also runs on the CPU (sp2), so it cannot rot between loans."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from imagine.config import AppConfig
from imagine.models.loading import load_components
from imagine.models.tiny import ensure_tiny_ltx2
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.types import GenerationSpec

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SPEC = GenerationSpec(prompt="a kettle whistling", negative_prompt="", width=160, height=96, num_frames=17,
                      num_inference_steps=3, seed=9, guidance_scale=3.0)
COMPONENTS = sorted(set(TextEncoderStage.components + DenoiserStage.components))


def _rel_err(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).float().cpu(), torch.as_tensor(expected).float().cpu()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max())


def _denoise(model_dir, device: str):
    components = load_components(model_dir, COMPONENTS, device, torch.float32)
    embeddings = TextEncoderStage(components, device)(SPEC.prompt, SPEC.negative_prompt, True)
    return DenoiserStage(components, device)(SPEC, embeddings), embeddings


@needs_cuda
def test_tiny_denoiser_on_cuda_matches_cpu(tmp_path):
    model_dir = ensure_tiny_ltx2(tmp_path)
    cpu, _ = _denoise(model_dir, "cpu")
    cuda, _ = _denoise(model_dir, "cuda")
    assert _rel_err(cuda.video, cpu.video) < 1e-3 and _rel_err(cuda.audio, cpu.audio) < 1e-3


def _parallel_denoise(rank: int, world_size: int, model_dir, embeddings, parallel: dict[str, int], device: str):
    """One rank: the tiny sampler on `device` (every rank the same device), its transformer sharded over the
    group; returns the final latents as numpy (a queue must not share tensor storage with an exited process)."""
    from imagine.parallel import enable_parallel

    components = load_components(model_dir, DenoiserStage.components, device, torch.float32)
    enable_parallel(components["transformer"], **parallel)
    with torch.inference_mode():
        latents = DenoiserStage(components, device)(SPEC, embeddings)
    return latents.video.cpu().numpy(), latents.audio.cpu().numpy()


@pytest.mark.parametrize(
    "device, parallel",
    [
        pytest.param("cpu", {"sequence": 2}, id="cpu-sp2"),
        pytest.param("cuda:0", {"sequence": 2}, id="cuda-sp2", marks=needs_cuda),
        pytest.param("cuda:0", {"tensor": 2}, id="cuda-tp2", marks=needs_cuda),
    ],
)
def test_two_ranks_on_one_device_over_gloo_equal_one_rank(tmp_path, device, parallel):
    from imagine.parallel.dist import run_ranks

    model_dir = ensure_tiny_ltx2(tmp_path)
    single, embeddings = _denoise(model_dir, device)
    outputs = run_ranks(
        _parallel_denoise, 2, model_dir, embeddings.to_cpu(), parallel, device, device=device, timeout_s=240
    )
    for video, audio in outputs:  # every rank returns the whole (gathered) result
        assert _rel_err(video, single.video) < 1e-3 and _rel_err(audio, single.audio) < 1e-3
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallel", [{"sequence": 2}, {"tensor": 2}], ids=["sp2", "tp2"])
def test_two_ranks_over_nccl_equal_one_gpu(tmp_path, parallel, ray_session):
    pytest.importorskip("ray")
    from imagine.serving.ranks import RankedLoop, RankGroup
    from imagine.serving.samplers import SamplerRank

    model_dir = ensure_tiny_ltx2(tmp_path)
    single, embeddings = _denoise(model_dir, "cuda")
    config = AppConfig.model_validate(
        {"home": str(tmp_path), "model": {"preset": "tiny", "device": "cuda", "dtype": "float32"},
         "denoiser": {"parallel": parallel}, "edit": {"enabled": False}}
    )
    with RankGroup(2, functools.partial(SamplerRank, config, "denoiser"), "cuda") as group:
        loop = RankedLoop(group)
        done, total = loop.begin(SPEC, embeddings.to_cpu(), None)  # as TextEncoderServer hands them over
        while done < total:
            done = loop.step()
        result = loop.finish()
        assert sorted(i.gpu_ids for i in group.info) == [("0",), ("1",)]
    assert _rel_err(result.video, single.video) < 1e-3 and _rel_err(result.audio, single.audio) < 1e-3
