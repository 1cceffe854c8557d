"""terraform/ checked offline: `terraform fmt` on every root; `init` (against the local provider mirror) +
`validate` + `terraform test` (mocked provider, terraform/aws/tests) for the aws root; a parse of the roots whose
providers cannot be fetched here (aws-addons, gcp) with structural checks; checkov with the reasoned skip list
in terraform/checkov-skips.yaml. Nothing is written into the repository: the aws root is initialised in a copy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TERRAFORM_DIR = REPO / "terraform"
ROOTS = ("aws", "aws-addons", "gcp")
AWS_PROVIDER_VERSION = "5.100.0"  # the version terraform/aws pins and the offline mirror holds
SKIPS_FILE = TERRAFORM_DIR / "checkov-skips.yaml"
CHECKOV = REPO / "scripts" / "checkov.sh"
CHECKOV_PYTHON = REPO / ".venv-checkov" / "bin" / "python"

TERRAFORM = shutil.which("terraform")
pytestmark = pytest.mark.skipif(
    TERRAFORM is None,
    reason="terraform is not on PATH: the terraform/ checks need terraform 1.11+ and its offline aws provider mirror",
)


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _explain(proc: subprocess.CompletedProcess, limit: int = 6000) -> str:
    return f"`{' '.join(map(str, proc.args))}` exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-limit:]}"


def _provider_mirror() -> Path:
    """The filesystem mirror: the folder above a `registry.terraform.io` folder at most 3 levels below /, holding
    hashicorp/aws at the pinned version."""
    for pattern in ("*/registry.terraform.io", "*/*/registry.terraform.io"):
        for registry in sorted(Path("/").glob(pattern)):
            if (registry / "hashicorp" / "aws" / AWS_PROVIDER_VERSION).is_dir():
                return registry.parent
    raise RuntimeError(
        f"no offline provider mirror with hashicorp/aws {AWS_PROVIDER_VERSION} "
        "(a registry.terraform.io folder within 3 levels of /): terraform init cannot run offline"
    )


@pytest.fixture(scope="module")
def tf_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for terraform: our own CLI config pointing at the mirror, no prompts, no version checks."""
    home = tmp_path_factory.mktemp("terraform-cli")
    config = home / "terraform.tfrc"
    config.write_text(
        "provider_installation {\n  filesystem_mirror {\n"
        f'    path    = "{_provider_mirror()}"\n    include = ["registry.terraform.io/hashicorp/aws"]\n'
        "  }\n}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
    env.update(TF_CLI_CONFIG_FILE=str(config), TF_IN_AUTOMATION="1", TF_INPUT="0", CHECKPOINT_DISABLE="1")
    return env


@pytest.fixture(scope="module")
def aws_root(tmp_path_factory: pytest.TempPathFactory, tf_env: dict[str, str]) -> Path:
    """A copy of terraform/aws, initialised without a backend (.terraform/ and the lock file land in the copy)."""
    root = tmp_path_factory.mktemp("terraform-aws") / "aws"
    shutil.copytree(
        TERRAFORM_DIR / "aws", root, ignore=shutil.ignore_patterns(".terraform", ".terraform.lock.hcl", "*.tfstate*")
    )
    proc = _run([TERRAFORM, "init", "-backend=false", "-input=false", "-no-color"], root, tf_env)
    assert proc.returncode == 0, _explain(proc)
    return root


def test_every_root_is_formatted() -> None:
    for root in ROOTS:
        assert sorted((TERRAFORM_DIR / root).glob("*.tf")), f"terraform/{root} has no .tf files"
    proc = _run([TERRAFORM, "fmt", "-check", "-recursive", "-diff", "-no-color", str(TERRAFORM_DIR)], REPO)
    assert proc.returncode == 0, "run `terraform fmt -recursive terraform`\n" + _explain(proc)


def test_aws_root_validates_against_the_pinned_provider(aws_root: Path, tf_env: dict[str, str]) -> None:
    lock = (aws_root / ".terraform.lock.hcl").read_text()
    assert re.search(
        rf'provider "registry.terraform.io/hashicorp/aws" {{\s*version\s*=\s*"{AWS_PROVIDER_VERSION}"', lock
    ), lock
    proc = _run([TERRAFORM, "validate", "-json", "-no-color"], aws_root, tf_env)
    result = json.loads(proc.stdout)
    problems = [f"{d['severity']}: {d['summary']}: {d.get('detail', '')}" for d in result["diagnostics"]]
    assert result["valid"] and result["error_count"] == 0, problems
    assert result["warning_count"] == 0, problems  # deprecations included: fix them, don't carry them


def test_aws_root_terraform_test_with_mocked_provider(aws_root: Path, tf_env: dict[str, str]) -> None:
    test_files = sorted((aws_root / "tests").glob("*.tftest.hcl"))
    sources = "".join(f.read_text() for f in test_files)
    runs = len(re.findall(r'^run "', sources, flags=re.MULTILINE))
    negative = len(re.findall(r"^\s*expect_failures\s*=", sources, flags=re.MULTILINE))
    assert runs >= 20 and negative >= 10, f"{runs} runs, {negative} with expect_failures in {test_files}"
    proc = _run([TERRAFORM, "test", "-no-color"], aws_root, tf_env, timeout=600)
    summary = re.search(r"Success! (\d+) passed, 0 failed\.", proc.stdout)
    assert proc.returncode == 0 and summary, _explain(proc)
    assert int(summary.group(1)) == runs, f"{summary.group(0)} but the test files hold {runs} runs"


# -- roots whose providers cannot be fetched here: parse + structure ------------------------------------------

_PARSE = """
import hcl2, json, pathlib, sys
out = {}
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/*.tf")):
    with path.open() as f:
        out[f"{path.parent.name}/{path.name}"] = hcl2.load(f)
json.dump(out, sys.stdout, default=str)
"""


@pytest.fixture(scope="module")
def parsed() -> dict[str, dict[str, Any]]:
    """Every root's .tf files parsed by the HCL2 parser checkov ships (in its own venv; nothing is installed into
    it), as {"root/file.tf": {...}}; a syntax error fails here."""
    _ensure_checkov()
    proc = _run([str(CHECKOV_PYTHON), "-c", _PARSE, str(TERRAFORM_DIR)], REPO)
    assert proc.returncode == 0, _explain(proc)
    return json.loads(proc.stdout)


def _blocks(parsed: dict[str, dict[str, Any]], root: str, kind: str) -> dict[str, dict[str, Any]]:
    """{type.name: body} of one root's resources / data sources, or {name: body} of its variables, outputs."""
    found: dict[str, dict[str, Any]] = {}
    for file, content in parsed.items():
        if not file.startswith(f"{root}/"):
            continue
        for block in content.get(kind, []):
            if kind in ("resource", "data"):
                for type_, named in block.items():
                    for name, body in named.items():
                        found[f"{type_}.{name}"] = body
            else:
                found.update(block)
    return found


def _locals(parsed: dict[str, dict[str, Any]], root: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for file, content in parsed.items():
        if file.startswith(f"{root}/"):
            for block in content.get("locals", []):
                values.update({k: v[0] for k, v in block.items() if not k.startswith("__")})
    return values


def _one(body: dict[str, Any], *path: str) -> Any:
    """body[a][0][b][0]...: the parser wraps every attribute value and nested block in a list."""
    value: Any = body
    for key in path:
        value = value[key][0]
    return value


def test_gcp_root_structure(parsed: dict[str, dict[str, Any]]) -> None:
    resources = _blocks(parsed, "gcp", "resource")
    variables = _blocks(parsed, "gcp", "variable")
    local = _locals(parsed, "gcp")
    assert local["pool_label_key"] == "imagine.dev/pool"
    assert local["gpu_taint"] == {"key": "nvidia.com/gpu", "value": "present", "effect": "NO_SCHEDULE"}

    gpu_pools = _one(variables["gpu_node_pools"], "default")
    assert {k: p["accelerator_count"] for k, p in gpu_pools.items()} == {"gpu-1": 1, "gpu-4": 4}
    pool = resources["google_container_node_pool.this"]
    autoscaling = _one(pool, "autoscaling")
    assert "? 0 :" in autoscaling["total_min_node_count"][0], "GPU pools must scale from zero"
    node_config = _one(pool, "node_config")
    kinds = {kind for block in node_config["dynamic"] for kind in block}
    assert {"guest_accelerator", "taint"} <= kinds, "GPU pools need accelerators and the GPU taint"
    assert _one(node_config, "workload_metadata_config", "mode") == "GKE_METADATA"

    cluster = resources["google_container_cluster.this"]
    assert _one(cluster, "workload_identity_config", "workload_pool") == "${var.project_id}.svc.id.goog"
    assert _one(cluster, "private_cluster_config", "enable_private_nodes") is True

    bucket = resources["google_storage_bucket.artifacts"]
    assert (
        _one(bucket, "uniform_bucket_level_access") is True and _one(bucket, "public_access_prevention") == "enforced"
    )
    assert _one(bucket, "lifecycle_rule", "action", "type") == "AbortIncompleteMultipartUpload"
    assert "lifecycle_rule" in {kind for block in bucket["dynamic"] for kind in block}, "per-prefix expiry rules"

    sql = resources["google_sql_database_instance.jobs"]
    ip = _one(sql, "settings", "ip_configuration")
    assert ip["ipv4_enabled"] == [False] and ip["ssl_mode"] == ["ENCRYPTED_ONLY"], "private IP only, TLS only"
    assert _one(sql, "settings", "availability_type") == "REGIONAL"

    redis = resources["google_redis_instance.gcs"]
    assert (_one(redis, "tier"), _one(redis, "auth_enabled"), _one(redis, "transit_encryption_mode")) == (
        "STANDARD_HA",
        True,
        "SERVER_AUTHENTICATION",
    )
    assert (local["app_namespace"], local["app_service_account"]) == ("imagine", "imagine")
    member = _one(resources["google_service_account_iam_member.app_workload_identity"], "member")
    assert member.endswith(".svc.id.goog[${local.app_namespace}/${local.app_service_account}]"), member
    assert (
        _one(resources["google_storage_bucket_iam_member.app_objects"], "bucket")
        == "${google_storage_bucket.artifacts.name}"
    )


def test_aws_addons_root_structure_and_agreement_with_the_aws_root(parsed: dict[str, dict[str, Any]]) -> None:
    resources = _blocks(parsed, "aws-addons", "resource")
    data = _blocks(parsed, "aws-addons", "data")
    variables = _blocks(parsed, "aws-addons", "variable")
    releases = {k.split(".", 1)[1]: v for k, v in resources.items() if k.startswith("helm_release.")}
    assert set(releases) == {"kuberay_operator", "nvidia_device_plugin", "cluster_autoscaler", "kube_prometheus_stack"}
    for name, release in releases.items():
        version = _one(release, "version")
        pinned = _one(variables[version.removeprefix("${var.").removesuffix("}")], "default")
        assert re.fullmatch(r"\d+\.\d+\.\d+", pinned), f"{name}: chart version {pinned!r} is not pinned"
        assert _one(release, "repository").startswith("https://"), name

    # Names the addons look up or create must be those the aws root makes and outputs.
    aws_resources = _blocks(parsed, "aws", "resource")
    aws_outputs = {k: _one(v, "value") for k, v in _blocks(parsed, "aws", "output").items()}
    aws_local, addons_local = _locals(parsed, "aws"), _locals(parsed, "aws-addons")
    assert (addons_local["namespace"], addons_local["service_account"]) == (
        aws_local["app_namespace"],
        aws_local["app_service_account"],
    )
    assert addons_local["pool_label_key"] == aws_local["pool_label_key"]
    assert _one(data["aws_db_instance.jobs"], "db_instance_identifier") == _one(
        aws_resources["aws_db_instance.jobs"], "identifier"
    )
    assert _one(data["aws_elasticache_replication_group.gcs"], "replication_group_id") == _one(
        aws_resources["aws_elasticache_replication_group.gcs"], "replication_group_id"
    )
    assert _one(data["aws_secretsmanager_secret_version.redis_auth"], "secret_id") == _one(
        aws_resources["aws_secretsmanager_secret.redis_auth"], "name"
    )
    database_secret = _one(resources["kubernetes_secret_v1.database"], "metadata", "name")
    assert database_secret == aws_outputs["database_url_env"]["secret_name"]
    assert set(_one(resources["kubernetes_secret_v1.database"], "data")) == {
        aws_outputs["database_url_env"]["secret_key"]
    }
    assert (
        _one(resources["kubernetes_secret_v1.redis"], "metadata", "name")
        == aws_outputs["redis_password_secret"]["secret_name"]
    )
    assert set(_one(resources["kubernetes_secret_v1.redis"], "data")) == {
        aws_outputs["redis_password_secret"]["secret_key"]
    }
    # ... and with what the RayService reads (cluster/base/rayservice.yaml): the same Secret names and keys
    rayservice = (Path(__file__).resolve().parents[1] / "cluster" / "base" / "rayservice.yaml").read_text()
    read = set(re.findall(r"secretKeyRef:\s*name:\s*(\S+)\s*key:\s*(\S+)", rayservice))
    for output in ("database_url_env", "redis_password_secret"):
        written = (aws_outputs[output]["secret_name"], aws_outputs[output]["secret_key"])
        assert written in read, (written, read)
    autoscaler_values = str(_one(releases["cluster_autoscaler"], "values"))  # the yamlencode() call, as text
    assert "'serviceAccount': {'create': True, 'name': 'cluster-autoscaler'}" in autoscaler_values, autoscaler_values
    assert (
        _one(aws_resources["aws_eks_pod_identity_association.cluster_autoscaler"], "service_account")
        == "cluster-autoscaler"
    )
    assert _one(variables["gpu_pools"], "default") == ["gpu-1", "gpu-4"]


# -- checkov --------------------------------------------------------------------------------------------------


def _ensure_checkov() -> None:
    """scripts/checkov.sh creates .venv-checkov on first use (under a lock, so concurrent callers are safe)."""
    if not CHECKOV_PYTHON.exists():
        proc = _run([str(CHECKOV), "--version"], REPO, timeout=900)
        assert proc.returncode == 0, _explain(proc)


def _skips() -> list[dict[str, str]]:
    skips = yaml.safe_load(SKIPS_FILE.read_text())["skips"]
    for skip in skips:
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+", skip["id"]), skip
        assert len(skip.get("reason", "").split()) >= 8, f"{skip['id']}: give the reason for skipping"
    ids = [s["id"] for s in skips]
    assert len(ids) == len(set(ids)), f"duplicate ids in {SKIPS_FILE.name}"
    return skips


def _checkov(*extra: str) -> dict[str, Any]:
    _ensure_checkov()
    proc = _run(
        [
            str(CHECKOV),
            "-d",
            str(TERRAFORM_DIR),
            "--framework",
            "terraform",
            "--quiet",
            "--compact",
            "-o",
            "json",
            "--skip-download",
            *extra,
        ],
        REPO,
        timeout=600,
    )
    assert proc.returncode in (0, 1) and proc.stdout.lstrip().startswith(("{", "[")), _explain(proc)
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert [r["check_type"] for r in reports] == ["terraform"], [r.get("check_type") for r in reports]
    return reports[0]


@pytest.fixture(scope="module")
def skip_ids() -> list[str]:
    return [s["id"] for s in _skips()]


def test_checkov_passes_with_only_the_reasoned_skips(skip_ids: list[str]) -> None:
    inline = [str(p) for p in TERRAFORM_DIR.rglob("*.tf") if "checkov:skip" in p.read_text()]
    assert not inline, f"inline checkov skips bypass {SKIPS_FILE.name}: {inline}"
    report = _checkov("--skip-check", ",".join(skip_ids))
    summary = report["summary"]
    print(
        f"checkov on terraform/: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
        f"({len(skip_ids)} check ids skipped by {SKIPS_FILE.name}), {summary['resource_count']} resources"
    )
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert summary["parsing_errors"] == 0, summary
    assert summary["failed"] == 0, "\n".join(failed)
    assert summary["passed"] >= 200 and summary["resource_count"] >= 100, f"checkov scanned too little: {summary}"


def test_every_checkov_skip_is_still_needed(skip_ids: list[str]) -> None:
    failing = {c["check_id"] for c in _checkov()["results"]["failed_checks"]}
    stale = sorted(set(skip_ids) - failing)
    assert not stale, f"{SKIPS_FILE.name} skips checks that now pass: {stale} (remove them)"
    assert failing <= set(skip_ids)  # the other test shows it too, with details
