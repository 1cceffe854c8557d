"""cluster/ checked offline, with no cluster and no Ray started: every kustomization renders (`kubectl kustomize`);
the RayService's Serve config passes Ray's ServeDeploySchema and imagine's AppConfig; Ray's KubeRay autoscaler
parser reads its worker groups and Ray's bin-packer fits every deployment's bundles (from imagine's own
`denoiser_options` / `serve_options`) into them; the launcher YAML passes Ray's schema; only Serve's port is exposed;
checkov and kubernetes-validate pass on the pod templates; the monitoring names only metrics that exist; Ray's
Grafana dashboards are the pinned Ray's."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from imagine.config import DATABASE_URL_ENV, AppConfig

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUSTOMIZATIONS = {"base": CLUSTER / "base", "eks": CLUSTER / "overlays" / "eks", "gke": CLUSTER / "overlays" / "gke"}
OVERLAYS = ("eks", "gke")
NAMESPACE = "imagine"
SERVE_PORT = 8000
RAY_POD_LABELS = {"app.kubernetes.io/name": "imagine", "app.kubernetes.io/component": "ray"}
GPU_GROUPS = {"gpu-1": 1, "gpu-4": 4}  # worker group -> GPUs per pod (terraform's imagine.dev/pool labels)
STAGES = ("text_encoder", "decoder", "grounder", "edit_codec")  # model stages besides the denoiser pools
HEAD = "headgroup"  # the autoscaler's name of the KubeRay head group
KUBERNETES_VERSION = "1.32.0"  # the kubectl here; kubernetes-validate checks against this API version


# -- rendering --------------------------------------------------------------------------------------------------------
def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not on PATH: `kubectl kustomize` renders cluster/ (install kubectl >= 1.27)")
    return path


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """kustomization name -> its rendered documents."""
    kubectl = _kubectl()
    out = {}
    for name, path in KUSTOMIZATIONS.items():
        proc = subprocess.run(
            [kubectl, "kustomize", str(path)], check=False, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, f"kubectl kustomize {path.relative_to(ROOT)} failed:\n{proc.stderr}"
        out[name] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def _ray_service(docs: list[dict]) -> dict:
    return _one(docs, "RayService", "imagine")


def _groups(ray_service: dict) -> dict[str, dict]:
    """Pod group name -> group spec: `head` first, then the worker groups."""
    cluster = ray_service["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def _serve_config(ray_service: dict) -> dict:
    return yaml.safe_load(ray_service["spec"]["serveConfigV2"])


def _app_config(ray_service: dict) -> AppConfig:
    (app,) = _serve_config(ray_service)["applications"]
    return AppConfig.model_validate(app["args"])


def _secret_keys(docs: list[dict]) -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
        for d in docs
        if d["kind"] == "Secret"
    }


def _autoscaling_config(ray_service: dict) -> dict:
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    ray_cr = {"metadata": {"name": "imagine", "namespace": NAMESPACE}, "spec": ray_service["spec"]["rayClusterConfig"]}
    return _derive_autoscaling_config_from_ray_cr(copy.deepcopy(ray_cr))


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_every_kustomization_renders_into_the_imagine_namespace(rendered, name):
    docs = rendered[name]
    kinds = sorted(d["kind"] for d in docs)
    expected = {"Namespace", "ServiceAccount", "RayService", "Ingress", "NetworkPolicy", "Secret"}
    if name != "base":
        expected |= {"PodMonitor", "ServiceMonitor", "PrometheusRule", "ConfigMap"}
    assert expected <= set(kinds), kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]
    # the Serve config's ConfigMap is build-local: copied into serveConfigV2, never applied
    assert not [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "imagine-serve-config"]
    assert "set from serve-config.yaml" not in _ray_service(docs)["spec"]["serveConfigV2"]


def test_example_secrets_are_marked_as_examples(rendered):
    """The committed Secret values are placeholders (a real one must never land in the repository)."""
    import base64

    for name in KUSTOMIZATIONS:
        for doc in rendered[name]:
            if doc["kind"] == "Secret":
                for key, value in doc.get("data", {}).items():
                    assert "CHANGE-ME" in base64.b64decode(value).decode(), (doc["metadata"]["name"], key)


# -- the Serve config: Ray's schema, then imagine's ---------------------------------------------------------------------
def _unknown_keys(given: dict, model: type) -> set[str]:
    return set(given) - set(model.model_fields)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_serve_config_passes_rays_schema(rendered, name):
    from ray.serve.schema import HTTPOptionsSchema, LoggingConfig, ServeApplicationSchema, ServeDeploySchema

    config = _serve_config(_ray_service(rendered[name]))
    schema = ServeDeploySchema.model_validate(config)
    # the schema ignores unknown keys: a typo (`http_option`) would pass it silently, so look for them too
    assert not _unknown_keys(config, ServeDeploySchema)
    assert not _unknown_keys(config.get("http_options", {}), HTTPOptionsSchema)
    assert not _unknown_keys(config.get("logging_config", {}), LoggingConfig)
    for app in config["applications"]:
        assert not _unknown_keys(app, ServeApplicationSchema), app["name"]
    # a pod's Serve proxy must listen on every interface for the Service to reach it
    assert schema.http_options.host in (None, "0.0.0.0") and schema.http_options.port == SERVE_PORT
    (app,) = schema.applications
    assert app.import_path == "imagine.serving.app:build_app" and app.route_prefix == "/"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_serve_config_args_are_a_production_app_config(rendered, name, monkeypatch):
    from imagine.models.presets import get_preset
    from imagine.serving.samplers import served_edit_preset, served_grounding_preset, served_preset

    config = _app_config(_ray_service(rendered[name]))
    assert config.model.device == "cuda" and config.model.dtype == "bfloat16"
    assert (served_preset(config).name, served_edit_preset(config).name, served_grounding_preset(config).name) == (
        "ltx-2",
        "wan-vace",
        "grounding",
    )
    for preset in ("ltx-2", "wan-vace"):  # what build_app checks before it binds anything
        assert {"480p", "720p"} <= set(config.accounting.price_per_second_usd[preset]), preset
    assert get_preset(config.edit.grounding_preset).family == "grounding"
    assert config.auth.enabled and config.artifacts_on_s3
    # the job store URL is not in the file: each replica reads it from the Secret-fed environment
    assert config.database_url is None
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql+psycopg://imagine:secret@db:5432/imagine")
    assert config.resolved_database_url == "postgresql+psycopg://imagine:secret@db:5432/imagine"
    # every pool that runs a model holds one GPU (per rank for a parallel pool) and may rest at zero replicas
    pools = config.sampler_pools()
    assert set(pools) == {"denoiser", "editor", "sp4"}
    for where, block in [*pools.items(), *((s, getattr(config, s)) for s in STAGES)]:
        assert block.num_gpus == 1 and block.autoscaling.min_replicas == 0, where
    assert pools["sp4"].parallel.sequence == 4 and pools["denoiser"].parallel.degree == 1
    assert config.ingress.num_gpus == 0 and config.scheduler.num_gpus == 0
    assert config.ingress.autoscaling.min_replicas >= 1  # the API answers with every GPU group at zero


def test_gke_serve_config_differs_from_the_base_in_storage_only(rendered):
    """The GKE overlay replaces the Serve config (Cloud Storage via its S3 API); pools and sizing stay the base's."""
    storage = {
        ("artifacts",),
        ("s3",),
        ("model", "source"),
        ("model", "s3_endpoint_url"),
        ("edit", "source"),
        ("edit", "grounding_source"),
    }

    def without_storage(config: dict) -> dict:
        config = copy.deepcopy(config)
        args = config["applications"][0]["args"]
        for path in storage:
            *parents, leaf = path
            block = args
            for key in parents:
                block = block.get(key, {})
            block.pop(leaf, None)
        return config

    base, gke = (_serve_config(_ray_service(rendered[n])) for n in ("base", "gke"))
    assert without_storage(gke) == without_storage(base)
    assert _app_config(_ray_service(rendered["gke"])).s3.endpoint_url == "https://storage.googleapis.com"


# -- the Ray cluster: KubeRay's spec as Ray's autoscaler reads it ------------------------------------------------------
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_ray_cluster_spec(rendered, name):
    docs = rendered[name]
    ray_service = _ray_service(docs)
    spec = ray_service["spec"]
    cluster = spec["rayClusterConfig"]
    secrets = _secret_keys(docs)
    assert cluster["rayVersion"] == ray.__version__
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]
    # GCS fault tolerance on an external Redis whose password comes from a rendered Secret
    ft = cluster["gcsFaultToleranceOptions"]
    assert re.fullmatch(r"rediss?://[^/\s]+:\d+", ft["redisAddress"]), ft["redisAddress"]
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in secrets[ref["name"]]
    # Ray token auth: KubeRay >= 1.5.1 `authOptions` (secretName >= 1.6), from a rendered Secret
    assert cluster["authOptions"]["mode"] == "token"
    assert "auth_token" in secrets[cluster["authOptions"]["secretName"]]
    groups = _groups(ray_service)
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    for group_name, group in groups.items():
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert RAY_POD_LABELS.items() <= group["template"]["metadata"]["labels"].items(), group_name
        assert pod["serviceAccountName"] == "imagine"
        env = {e["name"]: e for e in container["env"]}
        ref = env[DATABASE_URL_ENV]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]], group_name
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        resources = container["resources"]
        assert resources["requests"] == resources["limits"], group_name
        assert {"cpu", "memory"} <= set(resources["limits"]), group_name
        if group_name in GPU_GROUPS:
            assert resources["limits"]["nvidia.com/gpu"] == str(GPU_GROUPS[group_name])
            assert pod["nodeSelector"]["imagine.dev/pool"] == group_name
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
            assert group["minReplicas"] == 0 and group["replicas"] == 0, group_name
        else:
            assert "nvidia.com/gpu" not in resources["limits"] and "tolerations" not in pod, group_name
    sidecar = cluster["autoscalerOptions"]["resources"]
    assert sidecar["requests"] == sidecar["limits"]
    # the worker groups as Ray's autoscaler derives them from the CR
    node_types = _autoscaling_config(ray_service)["available_node_types"]
    assert set(node_types) == {HEAD, "cpu", *GPU_GROUPS}
    assert node_types[HEAD]["resources"]["CPU"] == 0 and "GPU" not in node_types[HEAD]["resources"]
    assert node_types["cpu"]["min_workers"] >= 1 and "GPU" not in node_types["cpu"]["resources"]
    for group_name, gpus in GPU_GROUPS.items():
        node = node_types[group_name]
        assert node["resources"]["GPU"] == gpus and node["min_workers"] == 0 and node["max_workers"] >= 1, node
        assert node["resources"]["memory"] > 0


def test_overlays_pin_their_clouds_gpu_nodes(rendered):
    selectors = {
        "eks": {
            "gpu-1": {"node.kubernetes.io/instance-type": "p5.4xlarge"},
            "gpu-4": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        },
        "gke": {g: {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"} for g in GPU_GROUPS},
    }
    # EKS: Pod Identity (terraform/aws's aws_eks_pod_identity_association for imagine/imagine), so no IRSA
    # annotation; GKE: Workload Identity needs the service account's annotation
    identity = {"eks": None, "gke": "iam.gke.io/gcp-service-account"}
    for name in OVERLAYS:
        groups = _groups(_ray_service(rendered[name]))
        for group_name, expected in selectors[name].items():
            node_selector = groups[group_name]["template"]["spec"]["nodeSelector"]
            assert expected.items() <= node_selector.items() and node_selector["imagine.dev/pool"] == group_name
        account = _one(rendered[name], "ServiceAccount", "imagine")
        annotations = account["metadata"].get("annotations", {})
        if identity[name] is None:
            assert "eks.amazonaws.com/role-arn" not in annotations, name
        else:
            assert identity[name] in annotations, name
        image = groups["head"]["template"]["spec"]["containers"][0]["image"]
        assert not image.startswith("registry.example.com/"), image


def test_images_match_the_pinned_ray():
    """The Dockerfile's base image is the Ray the RayService declares (rayVersion) and the project runs."""
    (base_image,) = re.findall(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert base_image.startswith(f"rayproject/ray:{ray.__version__}-"), base_image
    assert "-gpu" in base_image or "-cu" in base_image, base_image


# -- bin-packing: every deployment's bundles into the worker groups, with Ray's own autoscaler code ---------------------
def _actor_demand(options: dict[str, Any]) -> dict[str, float]:
    demand = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
    return {k: v for k, v in demand.items() if v > 0}


def _demands(config: AppConfig, at: str) -> tuple[list[dict[str, float]], dict[str, dict[str, float]]]:
    """Resource demands of every replica of the app at its `min` or `max` replica counts, as the autoscaler sees
    them (a STRICT_PACK placement group is one demand: the sum of its bundles), and the demand of one replica of each
    deployment by name. The options come from imagine itself: what build_app passes to serve.deployment."""
    from ray._private.gcs_utils import PlacementGroupTableData
    from ray.autoscaler._private.resource_demand_scheduler import placement_groups_to_resource_demands
    from ray.core.generated.common_pb2 import Bundle, PlacementStrategy

    from imagine.serving.app import denoiser_options

    demands: list[dict[str, float]] = []
    per_replica: dict[str, dict[str, float]] = {}

    def replicas(block) -> int:
        return block.autoscaling.min_replicas if at == "min" else block.autoscaling.max_replicas

    for pool, block in config.sampler_pools().items():
        options = denoiser_options(config, pool)
        if "placement_group_bundles" in options:
            assert options["placement_group_strategy"] == "STRICT_PACK", pool
            group = PlacementGroupTableData(
                strategy=PlacementStrategy.STRICT_PACK,
                bundles=[Bundle(unit_resources=b) for b in options["placement_group_bundles"]],
            )
            (demand,), _ = placement_groups_to_resource_demands([group])
            demand = dict(demand)
        else:
            demand = _actor_demand(options["ray_actor_options"])
        per_replica[pool] = demand
        demands += [demand] * replicas(block)
    stages = ["ingress", "text_encoder", "decoder"] + (["grounder", "edit_codec"] if config.edit.enabled else [])
    for stage in stages:
        block = getattr(config, stage)
        per_replica[stage] = _actor_demand(block.serve_options()["ray_actor_options"])
        demands += [per_replica[stage]] * replicas(block)
    per_replica["scheduler"] = _actor_demand(config.scheduler.serve_options()["ray_actor_options"])
    demands.append(per_replica["scheduler"])  # always exactly one
    return demands, per_replica


def _pack(node_types: dict[str, dict], demands: list[dict[str, float]]) -> tuple[dict[str, int], list[dict]]:
    """Nodes the autoscaler would run for `demands`: the head and every group's min_workers first, then what Ray's
    scheduler adds (within each group's max_workers). Returns node counts by type and the demands nothing fits."""
    from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary
    from ray.autoscaler._private.resource_demand_scheduler import (
        _default_utilization_scorer,
        get_bin_pack_residual,
        get_nodes_for,
    )

    running = {HEAD: 1, **{t: n["min_workers"] for t, n in node_types.items() if t != HEAD and n["min_workers"]}}
    nodes = [dict(node_types[t]["resources"]) for t, count in running.items() for _ in range(count)]
    residual, _ = get_bin_pack_residual(nodes, demands)
    added, residual = get_nodes_for(
        node_types,
        existing_nodes=running,
        head_node_type=HEAD,
        max_to_add=sum(n.get("max_workers", 0) for n in node_types.values()),
        resources=residual,
        utilization_scorer=partial(
            _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
        ),
    )
    counts = dict(running)
    for node_type, count in added.items():
        counts[node_type] = counts.get(node_type, 0) + count
    return counts, residual


def _kuberay_node_types(ray_service: dict) -> dict[str, dict]:
    return _autoscaling_config(ray_service)["available_node_types"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_replicas_bin_pack_into_the_worker_groups(rendered, name):
    ray_service = _ray_service(rendered[name])
    config = _app_config(ray_service)
    node_types = _kuberay_node_types(ray_service)
    # at rest (min replicas) the app fits the groups' minimum nodes: no GPU node runs
    demands, per_replica = _demands(config, "min")
    counts, residual = _pack(node_types, demands)
    assert not residual, f"at min replicas, unplaced: {residual}"
    assert all(counts.get(g, 0) == 0 for g in GPU_GROUPS), counts
    # at max replicas every replica finds a node within the groups' max_workers
    demands, per_replica = _demands(config, "max")
    counts, residual = _pack(node_types, demands)
    assert not residual, f"at max replicas, unplaced: {residual} (nodes: {counts})"
    for node_type, count in counts.items():
        assert count <= max(node_types[node_type]["max_workers"], 1), (node_type, count)
    # a STRICT_PACK group must fit on one node: the sp4 replica needs a whole gpu-4 node's GPUs
    sp4 = per_replica["sp4"]
    assert sp4["GPU"] == 4
    fits = [t for t, n in node_types.items() if all(n["resources"].get(k, 0) >= v for k, v in sp4.items())]
    assert fits == ["gpu-4"], (sp4, fits)


def test_bin_pack_refuses_a_pool_no_node_can_hold(rendered):
    """The check can fail: an 8-rank pool fits no 4-GPU node, and more replicas than a group's max_workers do not fit."""
    ray_service = _ray_service(rendered["base"])
    args = _serve_config(ray_service)["applications"][0]["args"]
    node_types = _kuberay_node_types(ray_service)
    sp8 = copy.deepcopy(args)
    sp8["denoiser_variants"]["sp8"] = {
        "num_cpus": 1,
        "num_gpus": 1,
        "parallel": {"sequence": 8, "cpus_per_rank": 4},
        "autoscaling": {"min_replicas": 0, "max_replicas": 1},
    }
    demands, per_replica = _demands(AppConfig.model_validate(sp8), "max")
    _, residual = _pack(node_types, demands)
    assert residual == [per_replica["sp8"]] and per_replica["sp8"]["GPU"] == 8
    too_many = copy.deepcopy(args)
    too_many["denoiser"]["autoscaling"]["max_replicas"] = 1 + sum(
        n["max_workers"] * n["resources"].get("GPU", 0) for n in node_types.values()
    )
    _, residual = _pack(node_types, _demands(AppConfig.model_validate(too_many), "max")[0])
    assert residual and all(d.get("GPU") == 1 for d in residual)


# -- the cluster launcher (`ray up`), the non-Kubernetes path ----------------------------------------------------------
@pytest.fixture(scope="module")
def launcher() -> tuple[dict, dict]:
    """(the YAML as written, as Ray prepares it for `ray up`: defaults merged, then validated by Ray's schema)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    written = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    prepared = prepare_config(copy.deepcopy(written))
    validate_config(prepared)
    return written, prepared


def test_launcher_yaml_passes_rays_schema(launcher):
    written, prepared = launcher
    assert prepared["provider"]["type"] == "aws"
    node_types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert node_types[head]["resources"] == {"CPU": 0}
    gpu_types = [t for t, n in node_types.items() if n["resources"].get("GPU")]
    assert gpu_types and all(node_types[t]["min_workers"] == 0 for t in gpu_types)
    (start_head,) = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert "--num-cpus=0" in start_head and "--dashboard-host=127.0.0.1" in start_head
    for command in [start_head, *[c for c in prepared["worker_start_ray_commands"] if "ray start" in c]]:
        assert "RAY_AUTH_MODE=token" in command and "IMAGINE_DATABASE_URL=" in command
    assert any(target.endswith(".ray/auth_token") for target in written["file_mounts"])
    assert any("pip install" in c and "imagine" in c for c in prepared["setup_commands"])


def test_launcher_node_types_hold_the_serve_config(launcher):
    """`serve deploy cluster/base/serve-config.yaml` on the launcher's cluster: the same bin-packing, at min and max."""
    _, prepared = launcher
    node_types = copy.deepcopy(prepared["available_node_types"])
    node_types[HEAD] = node_types.pop(prepared["head_node_type"])
    config = AppConfig.model_validate(
        yaml.safe_load((CLUSTER / "base" / "serve-config.yaml").read_text())["applications"][0]["args"]
    )
    for at in ("min", "max"):
        counts, residual = _pack(node_types, _demands(config, at)[0])
        assert not residual, (at, residual, counts)


# -- security: only Serve's port is reachable from outside the Ray pods -----------------------------------------------
@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_only_the_serve_port_is_exposed(rendered, name):
    docs = rendered[name]
    spec = _ray_service(docs)["spec"]
    head = spec["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    # the head Service carries the head container's ports: Ray's own and Serve's, never the Ray Client (10001)
    head_ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert set(head_ports) == {"gcs-server", "dashboard", "metrics", "as-metrics", "dash-metrics", "serve"}, head_ports
    assert 10001 not in head_ports.values() and head_ports["serve"] == SERVE_PORT
    serve = spec["serveService"]
    assert serve["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in serve["spec"]["ports"]] == [("serve", SERVE_PORT)]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    # the public route: /v1/... and /healthz to Serve's port, nothing else (no /metrics, no dashboard)
    ingress = _one(docs, "Ingress", "imagine")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert sorted((p["path"], p["pathType"]) for p in paths) == [("/healthz", "Exact"), ("/v1", "Prefix")]
    for path in paths:
        assert path["backend"]["service"] == {"name": serve["metadata"]["name"], "port": {"number": SERVE_PORT}}
    assert "defaultBackend" not in ingress["spec"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_network_policy_fences_the_ray_ports(rendered, name):
    docs = rendered[name]
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deny = [
        p
        for p in policies.values()
        if p["podSelector"] == {} and p["policyTypes"] == ["Ingress"] and not p.get("ingress")
    ]
    assert deny, "no default-deny ingress policy"
    ray_policy = policies["imagine-ray"]
    assert ray_policy["podSelector"]["matchLabels"].items() <= RAY_POD_LABELS.items()
    for group in _groups(_ray_service(docs)).values():
        assert ray_policy["podSelector"]["matchLabels"].items() <= group["template"]["metadata"]["labels"].items()
    for rule in ray_policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if not rule.get("from"):  # from anywhere: Serve's port only
            assert ports == {SERVE_PORT}, rule
        elif not ports:  # every port: the Ray pods themselves only
            assert rule["from"] == [{"podSelector": {"matchLabels": ray_policy["podSelector"]["matchLabels"]}}], rule
        else:
            assert not ports & {6379, 10001}, rule  # GCS and Ray client: Ray pods only
    peers = [peer for rule in ray_policy["ingress"] for peer in rule.get("from", [])]
    assert {"podSelector": {"matchLabels": ray_policy["podSelector"]["matchLabels"]}} in peers


# -- checkov and kubernetes-validate on the rendered manifests ---------------------------------------------------------
def _skips() -> list[dict]:
    skips = yaml.safe_load((CLUSTER / "checkov-skips.yaml").read_text())["skips"]
    for skip in skips:
        assert re.fullmatch(r"CKV2?_K8S_\d+", skip["id"]) and len(skip["reason"]) > 40, skip
        assert skip["pods"] == "all" or isinstance(skip["pods"], list), skip
    return skips


def _write_scan_tree(rendered: dict, root: Path, skips: list[dict]) -> None:
    """Every rendered document but the RayService (checkov ignores a CRD), plus each Ray group's pod template as
    `kind: Pod`, one folder per kustomization; per-pod skips become checkov.io/skip annotations."""
    for name, docs in rendered.items():
        folder = root / name
        folder.mkdir(parents=True)
        ray_service = _ray_service(docs)
        for group_name, group in _groups(ray_service).items():
            template = copy.deepcopy(group["template"])
            annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
            mine = [s for s in skips if s["pods"] != "all" and group_name in s["pods"]]
            for i, skip in enumerate(mine, 1):
                annotations[f"checkov.io/skip{i}"] = f"{skip['id']}=see cluster/checkov-skips.yaml"
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**template["metadata"], "name": f"imagine-{group_name}", "namespace": NAMESPACE},
                "spec": template["spec"],
            }
            (folder / f"pod-{group_name}.yaml").write_text(yaml.safe_dump(pod))
        others = [d for d in docs if d is not ray_service]
        (folder / "others.yaml").write_text(yaml.safe_dump_all(others))


def test_checkov_finds_nothing_unaccounted(rendered, tmp_path):
    skips = _skips()
    _write_scan_tree(rendered, tmp_path / "scan", skips)
    global_skips = ",".join(s["id"] for s in skips if s["pods"] == "all")
    proc = subprocess.run(
        [
            str(ROOT / "scripts" / "checkov.sh"),
            "-d",
            str(tmp_path / "scan"),
            "--framework",
            "kubernetes",
            "--compact",
            "-o",
            "json",
            "--skip-download",
            "--skip-check",
            global_skips,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert proc.stdout.strip(), f"checkov printed no report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(f["check_id"], f["file_path"], f["check_name"]) for r in reports for f in r["results"]["failed_checks"]]
    summary = {k: sum(r["summary"][k] for r in reports) for k in ("passed", "failed", "skipped", "resource_count")}
    print(f"checkov: {summary}")
    assert not failed, f"checkov findings not in cluster/checkov-skips.yaml: {failed}"
    assert summary["passed"] > 0 and summary["failed"] == 0
    # every per-pod skip still matches a finding (a stale entry would hide a future regression)
    # (not --quiet: that drops the lists of passed and skipped checks from the report)
    skipped = {(s["check_id"], Path(s["file_path"]).stem) for r in reports for s in r["results"]["skipped_checks"]}
    for skip in (s for s in skips if s["pods"] != "all"):
        for pod in skip["pods"]:
            assert (skip["id"], f"pod-{pod}") in skipped, (skip["id"], pod)


def _kubernetes_validate() -> Path:
    """kubernetes-validate in checkov's venv (scripts/checkov.sh makes it; this adds the one package, once)."""
    venv = ROOT / ".venv-checkov"
    binary = venv / "bin" / "kubernetes-validate"
    if not binary.exists():
        subprocess.run(
            [str(ROOT / "scripts" / "checkov.sh"), "--version"], check=True, capture_output=True, timeout=900
        )
        subprocess.run(
            [
                "flock",
                str(ROOT / ".venv-checkov.lock"),
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "kubernetes-validate==1.37.0",
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
    return binary


def test_pod_templates_and_core_objects_validate_strictly(rendered, tmp_path):
    """The Ray groups' pod templates (as PodTemplate) and every built-in object, against the Kubernetes API schema
    with unknown fields refused (a misspelt field inside a CRD's pod template is otherwise silently dropped)."""
    binary = _kubernetes_validate()
    core = {"Namespace", "ServiceAccount", "Secret", "ConfigMap", "Ingress", "NetworkPolicy", "Service"}
    files = []
    for name, docs in rendered.items():
        ray_service = _ray_service(docs)
        templates = [
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{name}-{g}", "namespace": NAMESPACE},
                "template": group["template"],
            }
            for g, group in _groups(ray_service).items()
        ]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(templates + [d for d in docs if d["kind"] in core]))
        files.append(str(path))
    proc = subprocess.run(
        [str(binary), "-k", KUBERNETES_VERSION, "--strict", "--quiet", *files],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- monitoring: the names it uses exist, Ray's dashboards are the pinned Ray's ----------------------------------------
def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_dashboards", CLUSTER / "monitoring" / "generate_dashboards.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_ray_dashboards_are_what_the_pinned_ray_generates():
    generator = _load_generator()
    for file_name, text in generator.generate().items():
        committed = (generator.DASHBOARDS_DIR / file_name).read_text()
        assert committed == text, f"{file_name} is stale: run python cluster/monitoring/generate_dashboards.py"
        assert f"rayVersion:{ray.__version__}" in json.loads(committed)["tags"]


def _sample_names(families) -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
    names = set()
    for family in families:
        names |= {family.name + s for s in suffixes.get(family.type, ("",))}
    return names


@pytest.fixture(scope="module")
def exported_metrics(tmp_path_factory) -> set[str]:
    """Sample names imagine's /metrics collector and Ray's autoscaler export (collected offline, no Ray started)."""
    from ray.autoscaler._private.prom_metrics import AutoscalerPrometheusMetrics

    from imagine.api.ops import DatabaseCollector
    from imagine.config import AccountingConfig
    from imagine.jobs.ledger import Ledger
    from imagine.jobs.store import JobStore

    store = JobStore(f"sqlite:///{tmp_path_factory.mktemp('metrics') / 'jobs.db'}")
    try:
        names = _sample_names(
            DatabaseCollector(store, Ledger(store.engine, AccountingConfig()), AccountingConfig()).collect()
        )
    finally:
        store.close()
    return names | _sample_names(AutoscalerPrometheusMetrics(session_name="offline").registry.collect())


def _ray_source_metric(name: str) -> bool:
    """A `ray_...` sample name is one of Ray's own metrics: its base name (no `ray_` prefix, no type suffix) is a
    metric name in the installed Ray's Serve or core sources."""
    base = name[len("ray_") :]
    candidates = {base} | {base[: -len(s)] for s in ("_total", "_bucket", "_count", "_sum") if base.endswith(s)}
    sources = _ray_sources()
    return any(f'"{c}"' in sources for c in candidates)


_RAY_SOURCES: list[str] = []


def _ray_sources() -> str:
    if not _RAY_SOURCES:
        root = Path(ray.__file__).parent
        _RAY_SOURCES.append(
            "\n".join(p.read_text(errors="ignore") for d in ("serve", "_private") for p in (root / d).rglob("*.py"))
        )
    return _RAY_SOURCES[0]


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers name labels (ray_io_cluster), not metrics
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"\b(?:imagine|ray|autoscaler)_[a-zA-Z0-9_]+\b", expr))


def _imagine_exprs(rendered) -> dict[str, str]:
    """where -> PromQL of every alert rule and of every panel of the Imagine dashboard."""
    rules = _one(rendered["eks"], "PrometheusRule", "imagine")
    exprs = {r["alert"]: r["expr"] for g in rules["spec"]["groups"] for r in g["rules"]}
    dashboard = json.loads((CLUSTER / "monitoring" / "dashboards" / "imagine.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    return exprs


def test_alerts_and_dashboard_use_only_exported_metrics(rendered, exported_metrics):
    exprs = _imagine_exprs(rendered)
    used = set()
    for where, expr in exprs.items():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
        names = _metric_names(expr)
        assert names, where
        for metric in names:
            known = metric in exported_metrics if not metric.startswith("ray_") else _ray_source_metric(metric)
            assert known, f"{where}: {metric} is exported by neither imagine nor the installed Ray"
        used |= names
    # what the alerts and the dashboard are for: queue age/depth, pending capacity, failures, cost, cold starts
    for metric in (
        "imagine_queue_depth",
        "imagine_queue_oldest_age_seconds",
        "imagine_queue_wait_seconds_bucket",
        "imagine_jobs_finished",
        "imagine_device_seconds_total",
        "imagine_cost_usd_total",
        "autoscaler_pending_nodes",
        "ray_serve_autoscaling_target_replicas",
        "ray_serve_deployment_replica_starts_total",
    ):
        assert metric in used, metric
    assert not _ray_source_metric("ray_serve_no_such_metric_total")  # the check can fail


def test_monitors_select_what_the_pods_expose(rendered):
    docs = rendered["eks"]
    ray_service = _ray_service(docs)
    groups = _groups(ray_service)
    pod_monitor = _one(docs, "PodMonitor", "imagine-ray")
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= RAY_POD_LABELS.items()
    head_ports = {p["name"] for p in groups["head"]["template"]["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "as-metrics", "dash-metrics"}
    assert {"metrics", "as-metrics", "dash-metrics"} <= head_ports
    for group_name, group in groups.items():
        assert "metrics" in {p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]}, group_name
    service_monitor = _one(docs, "ServiceMonitor", "imagine")
    serve = ray_service["spec"]["serveService"]
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= serve["metadata"]["labels"].items()
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["port"] == "serve" and endpoint["path"] == "/metrics"
    # with auth on, /metrics answers only the scrape token: Prometheus sends the one the serve pods are given
    credentials = endpoint["authorization"]["credentials"]
    for group_name, group in groups.items():
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert env["IMAGINE_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == credentials, group_name
    dashboards = {
        d["metadata"]["name"]
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    }
    assert dashboards == {
        "grafana-dashboard-imagine",
        "grafana-dashboard-ray-default",
        "grafana-dashboard-ray-serve",
        "grafana-dashboard-ray-serve-deployment",
    }
