"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin tiny LTX-2 model, built once per test session (diffusers pipeline layout)."""
    from imagine.models.tiny import build_tiny_ltx2

    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny-model") / "tiny")
