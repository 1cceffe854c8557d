"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[str]:
    """A real PostgreSQL (the installed binaries) for this session, trust auth on 127.0.0.1;
    yields its server URL without a database. Never skipped: failing to start fails the tests."""
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    base = Path(tempfile.mkdtemp(prefix="imagine-pg-"))
    if as_postgres:
        shutil.chown(base, "postgres", "postgres")
    data, log, port = base / "data", base / "server.log", _free_port()

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
