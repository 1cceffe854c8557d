"""Shared pytest fixtures: the tiny model, the session's PostgreSQL server, the session's local Ray, and the
auth-on API without Ray (`make_env`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from imagine.parallel.dist import free_port

if TYPE_CHECKING:
    import httpx
    from fastapi.testclient import TestClient

    from imagine.api.service import JobService
    from imagine.jobs import JobStore

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin tiny LTX-2 model, built once per test session (diffusers pipeline layout)."""
    from imagine.models.tiny import build_tiny_ltx2

    return build_tiny_ltx2(tmp_path_factory.mktemp("tiny-model") / "tiny")


# -- databases: every store / ledger test runs on SQLite and on a real PostgreSQL ------------------
POSTGRES_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in POSTGRES_BIN_DIRS if (Path(d) / name).is_file()), None
    )
    if found is None:
        raise RuntimeError(f"PostgreSQL binary {name!r} not found on PATH or in {POSTGRES_BIN_DIRS}")
    return found


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[str]:
    """A real PostgreSQL (the installed binaries) for this session, trust auth on 127.0.0.1;
    yields its server URL without a database. Never skipped: failing to start fails the tests."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    base = Path(tempfile.mkdtemp(prefix="imagine-pg-"))
    if as_postgres:
        shutil.chown(base, "postgres", "postgres")
    data, log, port = base / "data", base / "server.log", free_port()

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_postgres, *cmd], check=False, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}{server_log}")

    run(_pg_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(_pg_binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "60", "start")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        try:
            run(_pg_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def postgresql_url(postgresql_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL; dropped after the test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(f"{postgresql_server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgresql_server}/{name}"
    with psycopg.connect(f"{postgresql_server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job-store URL: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'imagine.db'}"
    return request.getfixturevalue("postgresql_url")


# -- S3: a real S3-compatible server (moto's server mode) on loopback -------------------------------------------
@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port for the session, with fake credentials in the environment (boto3's
    standard chain picks them up); yields its endpoint URL. Buckets are per test (random names)."""
    from moto.server import ThreadedMotoServer

    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        patch.setenv(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        patch.undo()


@pytest.fixture()
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the session's S3 server; its name."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


# -- Ray: one local Ray for the whole Ray tier ------------------------------------------------------------------
@pytest.fixture(scope="session")
def _ray_temp_dir() -> Iterator[str]:
    temp_dir = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # AF_UNIX socket paths must stay < 108 bytes
    yield temp_dir
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_session(_ray_temp_dir: str) -> Iterator[None]:
    """The session's local Ray, started by the first module that needs it and shared by every later one (Serve
    apps are deployed and deleted per module). Only `test_placement.py` needs a multi-node `Cluster` of its own: it
    shuts this one down, and the next module that asks starts it again. Workers import test modules by name (rank
    objects defined in tests), hence PYTHONPATH."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            logging_level="ERROR",
            _temp_dir=_ray_temp_dir,
            runtime_env={"env_vars": {"PYTHONPATH": TESTS_DIR}},
        )
    yield


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


# -- the HTTP API without Ray, auth on: FastAPI TestClient over a real job store (test_auth, test_admission,
# test_idempotency) ----------------------------------------------------------------------------------------------
@dataclass
class ApiEnv:
    client: TestClient
    service: JobService
    store: JobStore

    def key(self, tenant: str = "acme", tier: str = "standard", **limits: Any) -> dict[str, str]:
        """Headers of a new API key for `tenant`."""
        from imagine.config import KeyLimits

        key, _ = self.service.keys.create(tenant, tier, KeyLimits(**limits))
        return {"Authorization": f"Bearer {key}"}

    def create(self, headers: dict[str, str], **body: Any) -> httpx.Response:
        return self.client.post("/v1/videos/generations", json={"prompt": "p", **body}, headers=headers)

    def snapshot(self) -> list:
        """Every stored job and idempotency record (a rejected request must change neither)."""
        with self.store.engine.connect() as conn:
            jobs = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM jobs ORDER BY id")]
            keys = [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM idempotency_keys ORDER BY id")]
        return jobs + keys


@pytest.fixture()
def make_env() -> Iterator[Callable[..., ApiEnv]]:
    """`make_env(home, **AppConfig fields)` -> an `ApiEnv` serving the tiny preset (its store closed after the test)."""
    from fastapi.testclient import TestClient

    from imagine.api.routes import create_api
    from imagine.api.service import JobService
    from imagine.config import AppConfig
    from imagine.jobs import JobStore
    from imagine.models.presets import get_preset
    from imagine.storage import LocalArtifactStore

    made: list[ApiEnv] = []

    def make(home: Path, **config: Any) -> ApiEnv:
        cfg = AppConfig.model_validate({"home": str(home), **config})
        store = JobStore(cfg.resolved_database_url)
        artifacts = LocalArtifactStore(cfg.resolved_artifacts_dir)
        service = JobService(cfg, store, artifacts, {"tiny": get_preset("tiny")}, "tiny")
        made.append(ApiEnv(TestClient(create_api(service), raise_server_exceptions=False), service, store))
        return made[-1]

    yield make
    for env in made:
        env.store.close()


# -- tiers: every test module belongs to exactly one (pyproject markers); `-m "not ray"` is the fast loop ----------
TIERS: dict[str, tuple[str, ...]] = {
    "unit": (
        "test_admission", "test_api", "test_app_config", "test_auth", "test_autoscaling", "test_dialects", "test_edit_api", "test_fuzz",
        "test_hardening_api", "test_idempotency", "test_instructions", "test_intake", "test_jobs", "test_layering", "test_ledger",
        "test_cuda_defaults", "test_migrations",
        "test_hostile_media", "test_parallel_layout", "test_params", "test_policy", "test_postgres", "test_remote", "test_retention", "test_routing",
        "test_storage",
    ),
    "pipeline": (
        "test_dist", "test_gpu_session", "test_grounding", "test_masks", "test_media", "test_models", "test_parallel_sp",
        "test_parallel_tp", "test_pipeline", "test_runner", "test_tiled_decode", "test_vace",
    ),
    "ray": ("test_edit_serving", "test_parallel_serving", "test_placement", "test_ranks", "test_serving"),
    "e2e": ("test_e2e",),
    "gpu": ("test_gpu",),
    # cluster/ and terraform/ checked offline: kubectl kustomize, Ray's own schemas, terraform, checkov (own venv)
    "deploy": ("test_cluster_files", "test_terraform"),
}
_TIER_OF = {module: tier for tier, modules in TIERS.items() for module in modules}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its module's tier; an e2e test needs Ray too, so `-m "not ray"` leaves it out."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        tier = _TIER_OF.get(module)
        if tier is None:
            raise pytest.UsageError(f"{module}.py has no tier: add it to TIERS in tests/conftest.py")
        item.add_marker(tier)
        if tier == "e2e":
            item.add_marker("ray")
