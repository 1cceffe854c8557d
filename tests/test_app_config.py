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


# -- GPU reservations: `num_gpus: null` (auto) resolved per deployment ----------------------------------------------
MODEL_DEPLOYMENTS = ("TextEncoder", "Denoiser", "Denoiser-sp2", "Decoder", "Grounder", "EditCodec", "Editor")


def _gpus(deployment) -> float:
    return deployment.ray_actor_options.get("num_gpus", 0)


def _rank_bundles(deployment) -> list[dict]:
    bundles = deployment._replica_config.placement_group_bundles
    assert bundles is not None and deployment._replica_config.placement_group_strategy == "STRICT_PACK"
    return bundles[1:]  # bundle 0 is the replica's own


def test_on_cpu_no_deployment_reserves_a_gpu_by_default():
    deployments = _deployments(build_app({"denoiser_variants": {"sp2": {"parallel": {"sequence": 2}}}}))
    assert set(MODEL_DEPLOYMENTS) < set(deployments)
    for name, d in deployments.items():
        assert _gpus(d) == 0, name
    assert all("GPU" not in bundle for bundle in _rank_bundles(deployments["Denoiser-sp2"]))


def test_on_cuda_each_model_stage_reserves_one_gpu_and_explicit_values_are_kept():
    """cuda: 1 GPU per model stage / pool replica, none for the ingress and scheduler (given or not in the config);
    explicit values win (0.5 shares a card, 0 is kept, not taken for auto); a parallel pool's replica holds none and
    each rank bundle one, whatever its num_gpus."""
    args = {
        "model": {"device": "cuda"},
        "ingress": {"num_cpus": 0.2},  # given without num_gpus: still none
        "text_encoder": {"num_gpus": 0.5},
        "decoder": {"num_gpus": 0.5},
        "grounder": {"num_gpus": 0},
        "denoiser_variants": {"sp2": {"parallel": {"sequence": 2}}, "tp2": {"num_gpus": 0, "parallel": {"tensor": 2}}},
    }
    deployments = _deployments(build_app(args))
    expected = {
        "Ingress": 0, "Scheduler": 0, "TextEncoder": 0.5, "Decoder": 0.5, "Grounder": 0, "Denoiser": 1,
        "EditCodec": 1, "Editor": 1, "Denoiser-sp2": 0, "Denoiser-tp2": 0,
    }
    assert {name: _gpus(d) for name, d in deployments.items()} == expected
    for pool in ("Denoiser-sp2", "Denoiser-tp2"):
        assert [bundle["GPU"] for bundle in _rank_bundles(deployments[pool])] == [1.0, 1.0], pool
    assert deployments["Denoiser"]._replica_config.placement_group_bundles is None


def test_on_cpu_an_explicit_gpu_count_models_gpu_nodes():
    """CPU clusters and tests model GPU nodes with an explicit num_gpus: the stage reserves it, a parallel pool's
    ranks declare one each."""
    deployments = _deployments(build_app({
        "decoder": {"num_gpus": 1},
        "denoiser_variants": {"sp2": {"num_gpus": 1, "parallel": {"sequence": 2}}},
    }))
    assert _gpus(deployments["Decoder"]) == 1 and _gpus(deployments["TextEncoder"]) == 0
    assert _gpus(deployments["Denoiser-sp2"]) == 0
    assert [bundle["GPU"] for bundle in _rank_bundles(deployments["Denoiser-sp2"])] == [1.0, 1.0]


def test_stage_options_names_the_deployments():
    from imagine.config import AppConfig

    config = AppConfig.model_validate({"model": {"device": "cuda:1"}})
    assert config.stage_gpus("editor") == 1 and config.stage_gpus("scheduler") == 0
    with pytest.raises(ValueError, match=r"no deployment 'encoder'.*text_encoder"):
        config.stage_options("encoder")
