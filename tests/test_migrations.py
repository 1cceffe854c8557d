"""Alembic migrations of the job store, on SQLite and the real PostgreSQL: a fresh database reaches exactly the
tables the code defines, racing replicas are safe, a pre-migration database is adopted with its rows, a newer schema
is refused untouched, and `imagine db upgrade` is the manual path."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from job_helpers import generation_job

from imagine.cli import main as cli
from imagine.jobs import JobStore
from imagine.jobs.migrate import SchemaOutdated, SchemaTooNew, current_revision, head_revision, target_metadata, upgrade
from imagine.jobs.store import jobs_table, make_engine


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return current_revision(conn)
    finally:
        engine.dispose()


def test_fresh_database_matches_the_code(db_url: str) -> None:
    store = JobStore(db_url)
    try:
        with store.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            # autogenerate's diff of the migrated database against every Table the code defines: nothing missing
            assert compare_metadata(MigrationContext.configure(conn), target_metadata()) == []
    finally:
        store.close()


def test_replicas_racing_on_a_fresh_database(db_url: str) -> None:
    """Six replicas start at once against an empty database: one migrates, the others wait and find it done."""
    engines = [make_engine(db_url) for _ in range(6)]
    results: list[tuple[str | None, str]] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(len(engines))

    def start(engine: sa.Engine) -> None:
        try:
            gate.wait(timeout=30)
            results.append(upgrade(engine))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for e in engines:
        e.dispose()
    assert not errors, errors
    assert sorted(before or "" for before, _ in results) == [""] + [head_revision()] * 5  # exactly one migrated
    assert {after for _, after in results} == {head_revision()}
    store = JobStore(db_url)
    try:
        assert store.get(store.create(generation_job()).id).status.value == "queued"
    finally:
        store.close()


def test_a_pre_migration_database_is_adopted_with_its_rows(db_url: str) -> None:
    """A store written before migrations (create_all, no alembic_version, jobs without the later columns): its missing
    tables and columns are added, it is stamped, migrated to head, and every row is still there."""
    legacy = sa.MetaData()
    baseline_cols = [c for c in jobs_table.columns if c.name not in ("pool", "duration_s", "expires_at",
                                                                       "outputs_purged_at", "inputs_purged_at",
                                                                       "dialect", "deleted_at")]
    sa.Table("jobs", legacy, *[sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                               for c in baseline_cols])
    engine = make_engine(db_url)
    legacy.create_all(engine)
    job = generation_job(params={"duration": 3.0})
    with engine.begin() as conn:
        conn.execute(sa.insert(legacy.tables["jobs"]).values(
            id=job.id, tenant="acme", kind="generation", model="tiny", priority="standard", status="done",
            params=job.params.model_dump_json(), progress=1.0, cancel_requested=False, attempt=1,
            preempt_requested=False, preemptions=0, created_at=1.0e9, updated_at=1.0e9))
    engine.dispose()

    store = JobStore(db_url)
    try:
        record = store.get(job.id)
        assert (record.tenant, record.status.value, record.pool) == ("acme", "done", "denoiser")
        with store.engine.connect() as conn:
            assert current_revision(conn) == head_revision()
            assert compare_metadata(MigrationContext.configure(conn), target_metadata()) == []
            assert sa.inspect(conn).has_table("api_keys") and sa.inspect(conn).has_table("billing")
    finally:
        store.close()


def test_a_newer_schema_is_refused_untouched(db_url: str) -> None:
    JobStore(db_url).close()
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(SchemaTooNew, match=r"revision '9999_future'.*newer Imagine"):
        JobStore(db_url)
    with pytest.raises(SchemaTooNew):
        JobStore(db_url, migrate=False)
    with pytest.raises(SchemaTooNew):
        upgrade(engine)
    engine.dispose()
    assert _revision(db_url) == "9999_future"  # nothing was migrated or stamped over it
    assert cli(["db", "upgrade", "--database-url", db_url]) == 2


def test_migrate_on_start_off_refuses_an_outdated_schema_until_db_upgrade(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    engine.dispose()
    with pytest.raises(SchemaOutdated, match=r"imagine db upgrade"):
        JobStore(db_url, migrate=False)
    assert _revision(db_url) == "0001"

    assert cli(["db", "current", "--database-url", db_url]) == 0
    assert f"0001 (this Imagine's head is {head_revision()})" in capsys.readouterr().out
    assert cli(["db", "upgrade", "--database-url", db_url]) == 0
    assert f"0001 -> {head_revision()}" in capsys.readouterr().out
    JobStore(db_url, migrate=False).close()  # now it starts
    assert cli(["db", "upgrade", "--database-url", db_url]) == 0
    assert "up to date" in capsys.readouterr().out


def test_downgrade_path_is_reversible(db_url: str) -> None:
    """Each revision's downgrade undoes its upgrade (an operator rolling back a release can step back)."""
    from alembic import command

    from imagine.jobs.migrate import _config

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.begin() as conn:
            command.downgrade(_config(conn), "0001")
        with engine.connect() as conn:
            assert current_revision(conn) == "0001"
            assert "expires_at" not in {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
        upgrade(engine)
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), target_metadata()) == []
    finally:
        engine.dispose()
