"""`build_app` refuses configurations that would fail later, in replicas or at billing time."""

from __future__ import annotations

import pytest

from imagine.serving.app import build_app


def test_unpriced_served_model_is_refused_at_build_time():
    with pytest.raises(ValueError, match="price_per_second_usd"):
        build_app({"accounting": {"price_per_second_usd": {"ltx-2": {"480p": 0.05, "720p": 0.1}}}})


def test_unknown_fields_and_inverted_bounds_fail():
    with pytest.raises(ValueError, match="denoiserr"):
        build_app({"denoiserr": {}})
    with pytest.raises(ValueError, match=r"min_replicas \(3\) must be <= max_replicas \(2\)"):
        build_app({"decoder": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}})


def test_every_stage_pool_may_scale_to_zero():
    """min_replicas 0 everywhere a model runs; the denoiser pools keep the queue-depth policy, which reads the store
    itself (a pool at zero has no replica to report demand) and never carries the database URL from the env."""
    zero = {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}
    args = {key: zero for key in ("text_encoder", "denoiser", "decoder", "grounder", "edit_codec", "editor")}
    args["denoiser_variants"] = {"sp2": {**zero, "parallel": {"sequence": 2}}}
    deployments = _deployments(build_app(args))
    for name in ("TextEncoder", "Denoiser", "Denoiser-sp2", "Decoder", "Grounder", "EditCodec", "Editor"):
        assert deployments[name]._deployment_config.autoscaling_config.min_replicas == 0, name
    policy = deployments["Denoiser-sp2"]._deployment_config.autoscaling_config.policy
    assert policy.policy_function == "imagine.serving.autoscaling:QueueDepthPolicy"
    assert policy.policy_kwargs["pool"] == "sp2" and policy.policy_kwargs["database_url"] is None


def test_default_config_builds():
    assert build_app({}) is not None


def _deployments(app) -> dict:
    """name -> bound Deployment of every node of a built app graph (ingress first)."""
    from ray.serve.deployment import Application

    out, todo = {}, [app]
    while todo:
        d = todo.pop()._bound_deployment
        out[d.name] = d
        for arg in [*d.init_args, *d.init_kwargs.values()]:
            todo.extend(x for x in (arg.values() if isinstance(arg, dict) else [arg]) if isinstance(x, Application))
    return out


def test_shipped_serve_config_builds_every_deployment_with_its_options():
    """`serve_config.yaml` as shipped: its args are valid AppConfig fields and every stage gets the file's options
    (the e2e `serve deploy` test runs it with the edit path off, whose Serve tests are test_edit_serving.py)."""
    from pathlib import Path

    import yaml

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_config.yaml").read_text())
    args = shipped["applications"][0]["args"]
    deployments = _deployments(build_app(args))
    assert set(deployments) == {
        "Ingress", "Scheduler", "TextEncoder", "Denoiser", "Decoder", "Grounder", "EditCodec", "Editor"
    }
    for name, key in [("Ingress", "ingress"), ("TextEncoder", "text_encoder"), ("Denoiser", "denoiser"),
                      ("Decoder", "decoder"), ("Grounder", "grounder"), ("EditCodec", "edit_codec"),
                      ("Editor", "editor")]:
        d = deployments[name]
        assert d.ray_actor_options["num_cpus"] == args[key]["num_cpus"], name
        assert d.max_ongoing_requests == args[key]["max_ongoing_requests"], name
    assert not {"Grounder", "EditCodec", "Editor"} & set(_deployments(build_app({**args, "edit": {"enabled": False}})))
