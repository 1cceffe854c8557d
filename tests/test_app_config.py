"""`build_app` refuses configurations that would fail later, in replicas or at billing time."""

from __future__ import annotations

import pytest

from imagine.serving.app import build_app


def test_unpriced_served_model_is_refused_at_build_time():
    with pytest.raises(ValueError, match="price_per_second_usd"):
        build_app({"accounting": {"price_per_second_usd": {"ltx-2": {"480p": 0.05, "720p": 0.1}}}})


def test_denoiser_must_keep_a_replica_and_unknown_fields_fail():
    with pytest.raises(ValueError, match="min_replicas"):
        build_app({"denoiser": {"autoscaling": {"min_replicas": 0}}})
    with pytest.raises(ValueError, match="denoiserr"):
        build_app({"denoiserr": {}})


def test_default_config_builds():
    assert build_app({}) is not None
