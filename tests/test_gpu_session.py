"""The GPU session cannot rot between device loans: its CPU smoke run (the same driver and shell script, on the tiny
preset) runs every stage with the serving stack made absent, the GPU path imports without Ray / FastAPI /
SQLAlchemy / boto3 / PyAV, the full-size random LTX-2 has the released model's sizes, and the profile's kernel
classification reads real CUDA kernel names right."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# what the device image lacks and the GPU path must not need (PyAV only for the clip's mux, carried as a wheel)
SERVING_ONLY = "ray,fastapi,starlette,sqlalchemy,alembic,boto3,botocore,psycopg,uvicorn,sse_starlette,prometheus_client"

# Makes packages absent, as on the device: the path finder does not see them, so `import x` raises
# ModuleNotFoundError and `importlib.util.find_spec(x)` (how libraries probe optional packages) returns None.
BLOCKER = """
import importlib.machinery, os
BLOCK = set(filter(None, os.environ.get("BLOCK_IMPORTS", "").split(",")))
_find_spec = importlib.machinery.PathFinder.find_spec.__func__
def find_spec(cls, fullname, path=None, target=None):
    if fullname.split(".")[0] in BLOCK:
        return None
    return _find_spec(cls, fullname, path, target)
importlib.machinery.PathFinder.find_spec = classmethod(find_spec)
"""


def _env_without(tmp_path: Path, blocked: str) -> dict[str, str]:
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(site), "BLOCK_IMPORTS": blocked}


def _driver():
    if "gpu_session" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks" / "gpu_session.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_session"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_session"]


def test_blocker_makes_a_package_absent(tmp_path):
    code = "import importlib.util, sys; assert importlib.util.find_spec('boto3') is None; import boto3"
    proc = subprocess.run([sys.executable, "-c", code], env=_env_without(tmp_path, "boto3"), capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "No module named 'boto3'" in proc.stderr, proc.stderr


def test_gpu_path_imports_without_the_serving_stack_or_pyav(tmp_path):
    modules = [
        "imagine.config", "imagine.models.loading", "imagine.models.tiny", "imagine.models.full_size",
        "imagine.pipeline.encode", "imagine.pipeline.denoise", "imagine.pipeline.decode", "imagine.pipeline.generate",
        "imagine.pipeline.vace", "imagine.pipeline.masks", "imagine.pipeline.sizing", "imagine.pipeline.types",
        "imagine.parallel", "imagine.parallel.dist", "imagine.parallel.ulysses", "imagine.parallel.tensor",
        "imagine.parallel.comm", "imagine.parallel.routing",
    ]
    code = (
        f"import {', '.join(modules)}\n"
        "from diffusers import LTX2VideoTransformer3DModel, AutoencoderKLLTX2Video\n"
        "from diffusers.pipelines.ltx2 import LTX2Pipeline\n"
        f"import sys; leaked = sorted(set({SERVING_ONLY.split(',') + ['av']!r}) & set(sys.modules)); "
        "assert not leaked, leaked"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env_without(tmp_path, SERVING_ONLY + ",av"),
                          capture_output=True, text=True, timeout=180, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cpu_smoke_session_runs_every_stage(tmp_path):
    """scripts/gpu_session.sh exactly as on the device, on the CPU and the tiny preset, serving stack absent."""
    out = tmp_path / "out"
    env = {**_env_without(tmp_path, SERVING_ONLY), "OUT": str(out), "PYTHON": sys.executable,
           "WHEELS": str(tmp_path / "no-wheels"), "BUDGET": "400"}
    proc = subprocess.run(["bash", "scripts/gpu_session.sh", "--device", "cpu", "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=480, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = {row["stage"]: row for row in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert list(rows) == ["gemm", "transformer", "profile", "clip", "vae", "pytest"]
    failed = {name: row.get("error") for name, row in rows.items() if not row["ok"]}
    assert not failed, failed
    r = {name: row["result"] for name, row in rows.items()}

    assert r["gemm"]["tflops"] > 0
    step = r["transformer"]["480p"]
    # the tiny model at the real 2 s 480p token count: 7 latent frames x 15 x 27 (864x480 / 32)
    assert step["video_tokens"] == 7 * 15 * 27 and step["step_s"] > 0 and step["tflop_per_step"] > 0
    achieved = step["tflop_per_step"] / step["step_s"]
    assert step["mfu_gemm_ceiling"] == pytest.approx(achieved / r["gemm"]["tflops"], rel=0.02)
    assert step["mfu_datasheet"] is None  # no datasheet peak for a CPU
    assert sum(r["profile"]["split"].values()) == pytest.approx(1.0, abs=1e-3)
    assert r["profile"]["attention_kernel"] != "unknown" and r["profile"]["split"]["attention"] > 0
    assert (out / "profile.txt").read_text().count("\n") >= 5

    clip = r["clip"]
    assert set(clip["seconds"]) >= {"encode", "denoise", "decode", "mux"}
    assert clip["mp4"]["width"] == 864 and clip["mp4"]["height"] == 480 and clip["mp4"]["num_frames"] == 49
    assert clip["mp4"]["has_audio"] and clip["mp4"]["video_codec"] == "h264"
    assert clip["decode_tiled"]  # 864 px is wider than one 512 px tile: the tiled path ran
    assert r["vae"]["tiled"]["seconds"] > 0 and r["vae"]["whole"]["seconds"] > 0
    assert r["pytest"]["failures"] == 0 and r["pytest"]["errors"] == 0 and r["pytest"]["skipped"] >= 3

    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # the table is printed last
    assert (out / "device.txt").is_file() and (out / "session.log").is_file()


def test_session_records_a_stage_that_fails_or_overruns_and_goes_on(tmp_path):
    """A worker killed at its timeout keeps the stages it finished and the table says which did not run."""
    driver = _driver()
    out = tmp_path / "out"
    out.mkdir()
    driver.record(out, {"stage": "gemm", "ok": True, "seconds": 1.0, "result": {"tflops": 1.0, "n": 8, "dtype": "x"}})
    driver.record(out, {"stage": "transformer", "ok": False, "error": "worker killed at its 200s timeout"})
    table = driver.summary_table(driver.read_results(out))
    assert "| gemm | yes | 1.0 | 1.0 TFLOP/s" in table
    assert "| transformer | NO |  | worker killed at its 200s timeout |" in table


@pytest.mark.parametrize(
    "name, kind",
    [
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>>", "attention"),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm"),
        ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_NNT", "gemm"),
        ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "gemm"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>", "other"),
        ("aten::addmm", "gemm"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ],
)
def test_kernel_names_are_classified(name, kind):
    assert _driver().classify_kernel(name) == kind


def test_attention_backend_from_kernel_names():
    backend = _driver().attention_backend
    assert backend(["void pytorch_flash::flash_fwd_kernel<...>"]) == "flash"
    assert backend(["fmha_cutlassF_bf16_aligned_64x128_rf_sm80"]).startswith("mem_efficient")
    assert backend(["cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]) == "cudnn"
    assert backend(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == "sdpa (cpu kernel)"
    assert backend(["void at::native::softmax_warp_forward<...>"]) == "unknown"


# -- full-size random LTX-2 -----------------------------------------------------------------------------------------


def test_full_size_ltx2_has_the_released_sizes():
    """Built on `meta` (shapes only, seconds): the components real weights would fill, consistent with each other."""
    from imagine.models.full_size import build_full_ltx2

    c = build_full_ltx2("meta", torch.bfloat16)
    billions = {k: sum(p.numel() for p in v.parameters()) / 1e9 for k, v in c.items() if isinstance(v, torch.nn.Module)}
    assert billions["transformer"] == pytest.approx(18.88, abs=0.05)  # LTX-2 19B
    assert billions["text_encoder"] == pytest.approx(12.19, abs=0.05)  # Gemma 3 12B (+ SigLIP vision tower)
    assert billions["vae"] == pytest.approx(1.22, abs=0.01) and billions["connectors"] == pytest.approx(1.43, abs=0.01)
    assert all(p.dtype == torch.bfloat16 for p in c["transformer"].parameters())
    text = c["text_encoder"].config.text_config
    assert c["connectors"].config.caption_channels == text.hidden_size == c["transformer"].config.caption_channels
    assert c["connectors"].config.text_proj_in_factor == text.num_hidden_layers + 1
    vocab = len(c["tokenizer"])
    assert vocab < text.vocab_size  # every tokenizer id is a valid embedding row


def test_build_on_device_makes_real_values_and_refuses_unknown_buffers():
    from diffusers import AutoencoderKLLTX2Video, LTX2VideoTransformer3DModel

    from imagine.models.full_size import build_on_device
    from imagine.models.tiny import TRANSFORMER_CONFIG, VIDEO_VAE_CONFIG

    model = build_on_device(LTX2VideoTransformer3DModel, TRANSFORMER_CONFIG, "cpu", torch.float32)
    weights = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in weights.values())
    linear = next(p for n, p in weights.items() if n.endswith("weight") and p.ndim == 2 and p.numel() > 256)
    assert float(linear.std()) == pytest.approx(linear.shape[1] ** -0.5, rel=0.25)
    assert all(float(p.abs().max()) == 0 for n, p in weights.items() if n.endswith("bias"))

    vae = build_on_device(AutoencoderKLLTX2Video, VIDEO_VAE_CONFIG, "cpu", torch.float32)
    assert torch.equal(vae.latents_mean, torch.zeros_like(vae.latents_mean))
    assert torch.equal(vae.latents_std, torch.ones_like(vae.latents_std))

    class WithBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.register_buffer("inv_freq", torch.arange(4.0))

    with pytest.raises(RuntimeError, match="buffer 'inv_freq'"):
        build_on_device(WithBuffer, {}, "cpu", torch.float32)
