"""The defaults that make a real card work, decided without one: the auto dtype, TF32, where a tensor-parallel rank
loads its weights, the rank setup timeout, and whether a killed rank's process has exited. (GPU reservations:
test_app_config.py; loading straight onto the device and the weight sizes: test_models.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from imagine.config import AppConfig, ModelConfig
from imagine.serving.ranks import process_running
from imagine.serving.samplers import configure_torch, rank_load_device, rank_setup_timeout_s


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({}, "float32"),
        ({"device": "cuda"}, "bfloat16"),
        ({"device": "cuda:3"}, "bfloat16"),
        ({"device": "mps"}, "float32"),
        ({"device": "cuda", "dtype": "float32"}, "float32"),  # explicit values win
        ({"device": "cuda", "dtype": "float16"}, "float16"),
        ({"device": "cpu", "dtype": "bfloat16"}, "bfloat16"),
    ],
)
def test_resolved_dtype(model, expected):
    config = ModelConfig(**model)
    assert config.resolved_dtype == expected
    assert config.dtype == model.get("dtype")  # auto stays auto in the config itself


def test_resolved_dtype_follows_a_later_device_change():
    config = ModelConfig()
    config.device = "cuda:0"
    assert config.resolved_dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float64")


def test_the_router_budgets_the_resolved_dtype(monkeypatch):
    """Routing's memory model counts bytes per parameter from the dtype the pools actually load."""
    from imagine.parallel import routing
    from imagine.serving.app import build_router

    seen = []
    real = routing.Budget
    monkeypatch.setattr(routing, "Budget", lambda **kw: seen.append(kw) or real(**kw))
    for device, dtype, expected in (("cpu", None, 4), ("cuda", None, 2), ("cuda", "float32", 4)):
        config = AppConfig.model_validate(
            {"model": {"device": device, "dtype": dtype}, "denoiser_variants": {"sp2": {"parallel": {"sequence": 2}}}}
        )
        build_router(config)
        assert (seen[-1]["bytes_per_param"], seen[-1]["bytes_per_activation"]) == (expected, expected), device


@pytest.fixture()
def torch_flags() -> Iterator[None]:
    """Restore the process-wide torch settings `configure_torch` changes."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_num_threads(saved[2])


@pytest.mark.parametrize("tf32", [True, False])
def test_configure_torch_sets_tf32_on_cuda(torch_flags, tf32):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    configure_torch(AppConfig.model_validate({"model": {"device": "cuda:1", "tf32": tf32}}))
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    assert torch.get_float32_matmul_precision() == ("high" if tf32 else "highest")


def test_configure_torch_off_cuda_sets_threads_and_leaves_tf32_alone(torch_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    configure_torch(AppConfig.model_validate({"model": {"torch_threads": 1}}))  # tf32 defaults on, but this is cpu
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.get_num_threads() == 1
    assert ModelConfig().tf32 is True


@pytest.mark.parametrize(
    ("device", "tensor", "expected"),
    [
        ("cuda:1", 2, "cpu"),  # AutoTP shards host weights: the GPU only ever holds its shard
        ("cuda:0", 4, "cpu"),
        ("cuda:0", 1, "cuda:0"),  # sequence parallel / degree 1: every rank holds the whole model anyway
        ("cpu", 2, "cpu"),
        ("mps", 1, "mps"),
    ],
)
def test_where_a_rank_loads_its_weights(device, tensor, expected):
    assert rank_load_device(device, tensor) == expected


def test_rank_setup_timeout_grows_with_the_weights():
    assert rank_setup_timeout_s(0) == 120.0
    assert rank_setup_timeout_s(2**30) == 130.0
    assert rank_setup_timeout_s(38 * 2**30) == pytest.approx(500.0)  # LTX-2's denoiser weights
    with pytest.raises(ValueError, match="weight_bytes"):
        rank_setup_timeout_s(-1)


def test_process_running_tells_a_live_process_from_an_exited_one():
    """A killed rank counts as exited once it is a zombie (its memory is freed; its parent reaps it later)."""
    assert process_running(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_running(child.pid)
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # until it has exited, leaving it unreaped: a zombie
        assert os.kill(child.pid, 0) is None  # the pid still exists ...
        assert not process_running(child.pid)  # ... but the process does not run
    finally:
        child.kill()
        child.wait()
    assert not process_running(child.pid)
