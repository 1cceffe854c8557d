"""GPU tier (run on a lent GPU machine; skipped without CUDA): the tiny denoiser on CUDA equals the CPU loop, and
2-rank sequence- and tensor-parallel groups over NCCL (Ray rank actors, one GPU each) equal one GPU."""

from __future__ import annotations

import functools

import pytest
import torch

from imagine.config import AppConfig
from imagine.models.loading import load_components
from imagine.models.tiny import ensure_tiny_ltx2
from imagine.pipeline.denoise import DenoiserStage
from imagine.pipeline.encode import TextEncoderStage
from imagine.pipeline.types import GenerationSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SPEC = GenerationSpec(prompt="a kettle whistling", negative_prompt="", width=160, height=96, num_frames=17,
                      num_inference_steps=3, seed=9, guidance_scale=3.0)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float().cpu() - expected.float().cpu()).abs().max() / expected.float().abs().max())


def _denoise(model_dir, device: str):
    names = sorted(set(TextEncoderStage.components + DenoiserStage.components))
    components = load_components(model_dir, names, device, torch.float32)
    embeddings = TextEncoderStage(components, device)(SPEC.prompt, SPEC.negative_prompt, True)
    return DenoiserStage(components, device)(SPEC, embeddings), embeddings


def test_tiny_denoiser_on_cuda_matches_cpu(tmp_path):
    model_dir = ensure_tiny_ltx2(tmp_path)
    cpu, _ = _denoise(model_dir, "cpu")
    cuda, _ = _denoise(model_dir, "cuda")
    assert _rel_err(cuda.video, cpu.video) < 1e-3 and _rel_err(cuda.audio, cpu.audio) < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("parallel", [{"sequence": 2}, {"tensor": 2}], ids=["sp2", "tp2"])
def test_two_ranks_over_nccl_equal_one_gpu(tmp_path, parallel, ray_session):
    from imagine.serving.ranks import RankedLoop, RankGroup
    from imagine.serving.samplers import SamplerRank

    model_dir = ensure_tiny_ltx2(tmp_path)
    single, embeddings = _denoise(model_dir, "cuda")
    config = AppConfig.model_validate(
        {"home": str(tmp_path), "model": {"preset": "tiny", "device": "cuda"},
         "denoiser": {"parallel": parallel}, "edit": {"enabled": False}}
    )
    with RankGroup(2, functools.partial(SamplerRank, config, "denoiser"), "cuda") as group:
        loop = RankedLoop(group)
        done, total = loop.begin(SPEC, embeddings.to_cpu(), None)  # as TextEncoderServer hands them over
        while done < total:
            done = loop.step()
        parallel = loop.finish()
        assert sorted(i.gpu_ids for i in group.info) == [("0",), ("1",)]
    assert _rel_err(parallel.video, single.video) < 1e-3 and _rel_err(parallel.audio, single.audio) < 1e-3
