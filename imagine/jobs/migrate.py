"""Schema migrations of the job store (Alembic; scripts in `imagine/jobs/migrations/versions`).

`upgrade(engine)` brings a database to this code's head revision under a lock, so every replica of a fresh deployment
may call it at once (`imagine db upgrade`, and each store at start-up unless `migrate_on_start` is off): PostgreSQL
takes a transaction-scoped advisory lock, SQLite a file lock next to the database. A database whose revision this
code does not know (written by a newer Imagine) is refused with `SchemaTooNew`, never touched.

A database created before migrations existed (tables made by `create_all`, no `alembic_version`) gets the columns
and tables it lacks up to the baseline, is stamped `0001`, and continues from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.dialects import postgresql

_SCRIPTS = str(Path(__file__).with_name("migrations"))
_PG_LOCK_KEY = 0x1D_E4_D8_01  # PostgreSQL advisory lock id of schema migration (any constant of ours)
BASELINE = "0001"
# the jobs columns of the baseline: a pre-migration table lacking some gets them (with their defaults) before stamping
_BASELINE_JOB_COLUMNS = (
    "id", "tenant", "kind", "model", "priority", "status", "params", "progress", "cancel_requested", "attempt",
    "preempt_requested", "preemptions", "checkpoint_key", "error", "result", "created_at", "started_at",
    "finished_at", "updated_at", "api_key_id", "deadline_at", "pool", "duration_s",
)


_BACKFILL_WINDOW_S = 86_400  # admission sums one UTC day of jobs: older rows need no `duration_s`


def _backfill_duration_s(conn: sa.Connection) -> None:
    """`duration_s` of the rows of the last day (all that admission's daily sum reads) from their params JSON,
    in one UPDATE (SQLite's `json_extract`, PostgreSQL's `->>`)."""
    from imagine.jobs.store import jobs_table as j

    if conn.dialect.name == "postgresql":
        stored = sa.cast(j.c.params, postgresql.JSONB)["duration"].astext.cast(sa.Float)
    else:
        stored = sa.func.json_extract(j.c.params, "$.duration")
    conn.execute(
        sa.update(j)
        .where(j.c.created_at >= time.time() - _BACKFILL_WINDOW_S)
        .values(duration_s=sa.func.coalesce(stored, 0.0))
    )


# data migrations of a column a pre-migration table lacked, run in the transaction that adds it
_BACKFILLS: dict[str, Callable[[sa.Connection], None]] = {"duration_s": _backfill_duration_s}


class SchemaError(RuntimeError):
    """The database's schema is not the one this code runs against."""


class SchemaTooNew(SchemaError):
    """The database was migrated by a newer Imagine: this one must not run against it."""


class SchemaOutdated(SchemaError):
    """The database is behind this code and migrating on start is off: run `imagine db upgrade`."""


def target_metadata() -> list[sa.MetaData]:
    """Every table the code defines (what the migrations must produce)."""
    from imagine.jobs import idempotency, keys, ledger, store

    del ledger  # its tables live in the store's metadata; importing it registers them
    return [store.metadata, idempotency.idempotency_metadata, keys.keys_metadata]


def _config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", _SCRIPTS)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    head = scripts().get_current_head()
    assert head is not None, "no migration scripts"
    return head


def current_revision(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _known(revision: str) -> bool:
    try:
        return scripts().get_revision(revision) is not None
    except (ResolutionError, CommandError):  # an id none of the scripts has
        return False


def _check_not_newer(revision: str | None) -> None:
    if revision is not None and not _known(revision):
        raise SchemaTooNew(
            f"the job store's schema is at revision {revision!r}, which this Imagine does not know (its newest is "
            f"{head_revision()!r}): the database was migrated by a newer Imagine; run that version, or restore a "
            "backup taken before the upgrade"
        )


@contextlib.contextmanager
def _migration_lock(engine: sa.Engine) -> Iterator[sa.Connection]:
    """A connection in a transaction that holds the migration lock."""
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            yield conn
        return
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        with engine.begin() as conn:
            yield conn
        return
    lock_path = Path(path).with_name(Path(path).name + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        with engine.begin() as conn:
            yield conn


def _adopt_legacy(conn: sa.Connection) -> None:
    """A pre-migration database: add what the baseline has and it lacks, then stamp the baseline."""
    from imagine.jobs.store import jobs_table

    for meta in target_metadata():
        for table in meta.sorted_tables:
            if table.name != "jobs":
                table.create(conn, checkfirst=True)
    existing = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    for name in _BASELINE_JOB_COLUMNS:
        if name in existing:
            continue
        col = jobs_table.c[name]
        default = col.default.arg if col.default is not None and col.default.is_scalar else None
        if not col.nullable and default is None:
            raise SchemaError(f"cannot add NOT NULL column jobs.{name} without a default to the existing table")
        ddl = f"ALTER TABLE jobs ADD COLUMN {name} {col.type.compile(dialect=conn.dialect)}"
        if default is not None:
            literal = sa.literal(default, col.type).compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
            ddl += f" NOT NULL DEFAULT {literal}"
        conn.exec_driver_sql(ddl)
        backfill = _BACKFILLS.get(name)
        if backfill is not None:
            backfill(conn)
    # `create_all` never added an index to a table that existed: a table older than one of them lacks it
    indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("jobs")}
    for index in jobs_table.indexes:
        if index.name not in indexes and all(c.name in _BASELINE_JOB_COLUMNS for c in index.columns):
            index.create(conn)
    command.stamp(_config(conn), BASELINE)


def upgrade(engine: sa.Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate to `revision` (default: this code's head) under the migration lock; returns (before, after)."""
    with _migration_lock(engine) as conn:
        before = current_revision(conn)
        _check_not_newer(before)
        if before is None and sa.inspect(conn).has_table("jobs"):
            _adopt_legacy(conn)
        command.upgrade(_config(conn), revision)
        after = current_revision(conn)
    _ready.add(engine)
    return before, after or ""


def check(engine: sa.Engine) -> str | None:
    """The database's revision if it is this code's head; SchemaTooNew / SchemaOutdated otherwise."""
    with engine.connect() as conn:
        revision = current_revision(conn)
    _check_not_newer(revision)
    if revision != head_revision():
        raise SchemaOutdated(
            f"the job store's schema is at revision {revision!r}, behind this Imagine's {head_revision()!r}, and "
            "migrate_on_start is off: run `imagine db upgrade` first"
        )
    return revision


_ready: weakref.WeakSet[sa.Engine] = weakref.WeakSet()  # engines this process has seen at head
_ready_lock = threading.Lock()


def ensure_schema(engine: sa.Engine, migrate: bool = True) -> None:
    """Make sure `engine`'s database is at head: migrate it (locked) or only check it; once per engine."""
    if engine in _ready:
        return
    with _ready_lock:
        if engine in _ready:
            return
        if migrate:
            upgrade(engine)
        else:
            check(engine)
            _ready.add(engine)
