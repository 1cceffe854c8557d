"""Durable job state on SQLAlchemy Core: SQLite (WAL) by default, PostgreSQL in a cluster.

Every state change is one conditional UPDATE (``... WHERE status = <expected>``), so concurrent
ingress replicas, the scheduler and stage replicas never overwrite each other's transitions, and a
rejected request never touches a stored row. A job's ``attempt`` counts dispatches; results of a
stale attempt (a worker that outlived a restart) are ignored.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from imagine.jobs.params import JobKind, JobParams, params_for, params_type

metadata = sa.MetaData()
DEFAULT_POOL = "denoiser"  # the pool of generation jobs when no router picks a parallel variant

jobs_table = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False, default="default"),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("priority", sa.String(16), nullable=False, default="standard"),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("preempt_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("preemptions", sa.Integer, nullable=False, default=0),
    sa.Column("checkpoint_key", sa.String(512), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("api_key_id", sa.String(64), nullable=True),  # the API key that created the job (None: auth off)
    sa.Column("deadline_at", sa.Float, nullable=True),  # X-Start-Deadline: expire if still queued after this
    # which deployment's slots the job needs: "denoiser", a parallel variant ("sp4"), "editor"
    sa.Column("pool", sa.String(64), nullable=False, default=DEFAULT_POOL),
    # `params.duration` as a column: admission sums a key's requested seconds per day in SQL
    sa.Column("duration_s", sa.Float, nullable=False, default=0.0),
    # retention: when a done job's outputs are deleted, and when the sweeper deleted its outputs / inputs + work files
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("outputs_purged_at", sa.Float, nullable=True),
    sa.Column("inputs_purged_at", sa.Float, nullable=True),
    # the API the job was created through (how a shared route renders it), and when its owner deleted it
    sa.Column("dialect", sa.String(16), nullable=False, server_default="imagine"),
    sa.Column("deleted_at", sa.Float, nullable=True),
    sa.Index("ix_jobs_status_created", "status", "created_at"),
    sa.Index("ix_jobs_queue_heads", "status", "tenant", "priority", "created_at"),
    sa.Index("ix_jobs_queue_heads_pool", "status", "pool", "tenant", "priority", "created_at"),
    sa.Index("ix_jobs_tenant_created", "tenant", "created_at"),
    sa.Index("ix_jobs_api_key_status", "api_key_id", "status"),
    sa.Index("ix_jobs_sweep_inputs", "inputs_purged_at", "status"),
    sa.Index("ix_jobs_sweep_outputs", "outputs_purged_at", "expires_at"),
)


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)


class StepSignal(str, Enum):
    """What a running denoising loop should do after the step it just reported."""

    CONTINUE = "continue"
    CANCEL = "cancel"  # cancelled, or this attempt is stale: stop and drop the work
    PREEMPT = "preempt"  # checkpoint at this boundary and give the slot back


class JobNotFound(KeyError):
    """No job with this id (for this tenant)."""


class JobStateConflict(RuntimeError):
    """The job is not in a state that allows the requested transition."""

    def __init__(self, job_id: str, status: JobStatus, action: str):
        super().__init__(f"job {job_id} is {status.value}; cannot {action}")
        self.job_id = job_id
        self.status = status
        self.action = action


@dataclass(frozen=True)
class JobRecord:
    id: str
    tenant: str
    kind: JobKind
    model: str
    priority: str
    status: JobStatus
    params: JobParams  # GenerationParams for kind "generation", EditParams for "edit"
    progress: float
    cancel_requested: bool
    attempt: int
    preempt_requested: bool
    preemptions: int
    checkpoint_key: str | None
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    api_key_id: str | None = None
    deadline_at: float | None = None
    pool: str = DEFAULT_POOL
    expires_at: float | None = None  # a done job's outputs are deleted at this time (None: kept)
    outputs_purged_at: float | None = None
    dialect: str = "imagine"  # the API it was created through: imagine | openai | xai
    deleted_at: float | None = None  # deleted by its owner: gone from the API, its files swept

    def expired(self, now: float | None = None) -> bool:
        """Whether this job's outputs are past their retention (deleted, or about to be)."""
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class NewJob:
    kind: JobKind
    model: str
    params: JobParams  # the model of `kind` (`imagine.jobs.params.params_type`)
    tenant: str = "default"
    priority: str = "standard"
    id: str = field(default_factory=new_job_id)
    api_key_id: str | None = None
    deadline_at: float | None = None
    pool: str = DEFAULT_POOL
    dialect: str = "imagine"

    def __post_init__(self) -> None:
        expected = params_type(self.kind)
        if not isinstance(self.params, expected):
            raise TypeError(f"a {self.kind!r} job takes {expected.__name__}, got {type(self.params).__name__}")


# keys an older version stored that the typed params no longer have (dropped on read, so its rows still load)
_RETIRED_PARAMS: dict[str, tuple[str, ...]] = {"edit": ("image_key",)}


def load_params(kind: str, text: str) -> JobParams:
    """A stored `params` column, typed by the job's kind."""
    data = json.loads(text)
    for key in _RETIRED_PARAMS.get(kind, ()):
        data.pop(key, None)
    return params_for(kind, data)


def _row_to_record(row: sa.Row) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"],
        tenant=m["tenant"],
        kind=m["kind"],
        model=m["model"],
        priority=m["priority"],
        status=JobStatus(m["status"]),
        params=load_params(m["kind"], m["params"]),
        progress=float(m["progress"]),
        cancel_requested=bool(m["cancel_requested"]),
        attempt=int(m["attempt"]),
        preempt_requested=bool(m["preempt_requested"]),
        preemptions=int(m["preemptions"]),
        checkpoint_key=m["checkpoint_key"],
        error=json.loads(m["error"]) if m["error"] else None,
        result=json.loads(m["result"]) if m["result"] else None,
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        updated_at=m["updated_at"],
        api_key_id=m["api_key_id"],
        deadline_at=m["deadline_at"],
        pool=m["pool"],
        expires_at=m["expires_at"],
        outputs_purged_at=m["outputs_purged_at"],
        dialect=m["dialect"],
        deleted_at=m["deleted_at"],
    )


def make_engine(url: str) -> sa.Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and its parent directory created."""
    if url.startswith("sqlite"):
        path = sa.engine.make_url(url).database
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


_ADMISSION_LOCK_KEY = 0x1D_E4_A1_5E  # PostgreSQL advisory lock id of job admission (any constant of ours)


class JobStore:
    """Jobs as rows; all transitions are atomic conditional updates."""

    def __init__(self, url: str, engine: sa.Engine | None = None, migrate: bool = True):
        """`migrate`: bring the schema to this code's head (locked, safe from every replica at once); False: only
        check it is at head (`imagine db upgrade` ran), refusing an older or newer schema."""
        from imagine.jobs.migrate import ensure_schema

        self.url = url
        self.engine = engine or make_engine(url)
        # SQLite admits one writer; threads of one process queue on this lock instead of on SQLite's
        # busy handler, which sleeps in steps of up to 100 ms (the p99 tail of concurrent creates)
        self._sqlite_writes = threading.Lock() if self.engine.dialect.name == "sqlite" else None
        ensure_schema(self.engine, migrate)

    def close(self) -> None:
        self.engine.dispose()

    # -- reads -----------------------------------------------------------------------------
    def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        query = sa.select(jobs_table).where(jobs_table.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs_table.c.tenant == tenant)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise JobNotFound(job_id)
        return _row_to_record(row)

    def list_by_status(self, status: JobStatus, limit: int = 1000) -> list[JobRecord]:
        query = (
            sa.select(jobs_table)
            .where(jobs_table.c.status == status.value)
            .order_by(jobs_table.c.created_at, jobs_table.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [_row_to_record(r) for r in conn.execute(query)]

    def list_page(
        self, tenant: str, limit: int, after: str | None = None, order: str = "desc"
    ) -> tuple[list[JobRecord], bool]:
        """One page of `tenant`'s jobs (not deleted) by creation time, `order` asc|desc, starting after job `after`
        (a cursor: the last id of the previous page; a job of another tenant, or none, raises JobNotFound); returns
        (jobs, whether more follow)."""
        j = jobs_table
        query = sa.select(j).where(j.c.tenant == tenant, j.c.deleted_at.is_(None))
        ascending = order == "asc"
        if after is not None:
            with self.engine.connect() as conn:
                cursor = conn.execute(
                    sa.select(j.c.created_at, j.c.id).where(j.c.id == after, j.c.tenant == tenant)
                ).first()
            if cursor is None:
                raise JobNotFound(after)
            key = sa.tuple_(j.c.created_at, j.c.id)
            query = query.where(key > sa.tuple_(*cursor) if ascending else key < sa.tuple_(*cursor))
        columns = (j.c.created_at, j.c.id) if ascending else (j.c.created_at.desc(), j.c.id.desc())
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(*columns).limit(limit + 1)).fetchall()
        return [_row_to_record(r) for r in rows[:limit]], len(rows) > limit

    def mark_deleted(self, job_id: str, now: float) -> bool:
        """Its owner deleted the job: hide it from the API and let the sweeper delete its outputs now (expiry moved
        to now) and its inputs once it has ended. False when it was already deleted."""
        j = jobs_table
        with self.write_guard(), self.engine.begin() as conn:
            return conn.execute(
                sa.update(j)
                .where(j.c.id == job_id, j.c.deleted_at.is_(None))
                .values(
                    deleted_at=now,
                    updated_at=now,
                    expires_at=sa.case((j.c.expires_at.is_(None), now), (j.c.expires_at > now, now),
                                       else_=j.c.expires_at),
                )
            ).rowcount == 1

    def count_by_status(self) -> dict[str, int]:
        query = sa.select(jobs_table.c.status, sa.func.count()).group_by(jobs_table.c.status)
        with self.engine.connect() as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    # -- writes ----------------------------------------------------------------------------
    def create(self, job: NewJob) -> JobRecord:
        with self.engine.begin() as conn:
            self.insert(conn, job)
        return self.get(job.id)

    def insert(self, conn: sa.Connection, job: NewJob, now: float | None = None) -> None:
        """Insert `job` as queued inside the caller's transaction (the API runs admission checks and the
        Idempotency-Key record in the same one, so a rejected request leaves no row behind)."""
        now = time.time() if now is None else now
        values = {
            "id": job.id,
            "tenant": job.tenant,
            "kind": job.kind,
            "model": job.model,
            "priority": job.priority,
            "status": JobStatus.QUEUED.value,
            "params": job.params.model_dump_json(),
            "duration_s": job.params.duration,
            "progress": 0.0,
            "cancel_requested": False,
            "attempt": 0,
            "created_at": now,
            "updated_at": now,
            "api_key_id": job.api_key_id,
            "deadline_at": job.deadline_at,
            "pool": job.pool,
            "dialect": job.dialect,
        }
        conn.execute(sa.insert(jobs_table).values(**values))

    # -- admission (read inside the creating transaction, after its insert: SQLite then holds the write
    # lock, so concurrent creates are counted one after the other) ------------------------------------
    def write_guard(self) -> contextlib.AbstractContextManager:
        """Hold around a write transaction of this process (a no-op on PostgreSQL)."""
        return self._sqlite_writes if self._sqlite_writes is not None else contextlib.nullcontext()

    @staticmethod
    def lock_for_admission(conn: sa.Connection) -> None:
        """Serialize admitting transactions, so limits are never overshot by concurrent creates: PostgreSQL
        takes a transaction-scoped advisory lock; SQLite needs nothing (its first write locks the database)."""
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMISSION_LOCK_KEY})

    @staticmethod
    def _owner(tenant: str, api_key_id: str | None) -> sa.ColumnElement[bool]:
        j = jobs_table
        return j.c.api_key_id == api_key_id if api_key_id is not None else j.c.tenant == tenant

    def count_active(self, conn: sa.Connection, tenant: str, api_key_id: str | None, exclude_id: str) -> dict[str, int]:
        """Queued and running jobs of a key (of the tenant when `api_key_id` is None), without `exclude_id`."""
        j = jobs_table
        query = (
            sa.select(j.c.status, sa.func.count())
            .where(
                self._owner(tenant, api_key_id), j.c.id != exclude_id,
                j.c.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
            )
            .group_by(j.c.status)
        )
        counts = {JobStatus.QUEUED.value: 0, JobStatus.RUNNING.value: 0}
        counts.update({status: int(n) for status, n in conn.execute(query)})
        return counts

    def count_queued_in_tier(self, conn: sa.Connection, priority: str, exclude_id: str) -> int:
        j = jobs_table
        query = sa.select(sa.func.count()).where(
            j.c.status == JobStatus.QUEUED.value, j.c.priority == priority, j.c.id != exclude_id
        )
        return int(conn.execute(query).scalar_one())

    def requested_seconds_since(
        self, conn: sa.Connection, tenant: str, api_key_id: str | None, since: float, exclude_id: str
    ) -> float:
        """Sum of requested `duration` of a key's jobs created since `since`; failed, expired and
        cancelled-before-start jobs do not count. One aggregate in the database (`duration_s`)."""
        j = jobs_table
        query = sa.select(sa.func.coalesce(sa.func.sum(j.c.duration_s), 0.0)).where(
            self._owner(tenant, api_key_id), j.c.id != exclude_id, j.c.created_at >= since,
            j.c.status.not_in([JobStatus.FAILED.value, JobStatus.EXPIRED.value]),
            sa.not_(sa.and_(j.c.status == JobStatus.CANCELLED.value, j.c.started_at.is_(None))),
        )
        return float(conn.execute(query).scalar_one())

    def expire_overdue(self, now: float | None = None) -> list[str]:
        """queued -> expired (finished_at set) for every job whose start deadline has passed, in one
        conditional UPDATE; returns their ids. The scheduler calls this before each claim."""
        now = time.time() if now is None else now
        j = jobs_table
        error = {
            "type": "deadline_error", "code": "start_deadline_exceeded",
            "message": "the job did not start before its X-Start-Deadline",
        }
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.update(j)
                .where(j.c.status == JobStatus.QUEUED.value, j.c.deadline_at.is_not(None), j.c.deadline_at <= now)
                .values(status=JobStatus.EXPIRED.value, finished_at=now, updated_at=now, error=json.dumps(error))
                .returning(j.c.id)
            ).all()
        return [job_id for (job_id,) in rows]

    def _transition(
        self,
        job_id: str,
        expected: tuple[JobStatus, ...],
        values: dict[str, Any],
        attempt: int | None = None,
        extra: list[Any] | None = None,
    ) -> bool:
        cond = [jobs_table.c.id == job_id, jobs_table.c.status.in_([s.value for s in expected]), *(extra or [])]
        if attempt is not None:
            cond.append(jobs_table.c.attempt == attempt)
        values = {**values, "updated_at": time.time()}
        with self.engine.begin() as conn:
            return conn.execute(sa.update(jobs_table).where(*cond).values(**values)).rowcount == 1

    def claim(self, job_id: str) -> JobRecord | None:
        """queued -> running for one job; None when somebody else claimed or cancelled it first."""
        now = time.time()
        with self.engine.begin() as conn:
            updated = conn.execute(
                sa.update(jobs_table)
                .where(jobs_table.c.id == job_id, jobs_table.c.status == JobStatus.QUEUED.value)
                .values(
                    status=JobStatus.RUNNING.value,
                    started_at=now,
                    updated_at=now,
                    preempt_requested=False,
                    attempt=jobs_table.c.attempt + 1,
                )
            ).rowcount
        return self.get(job_id) if updated == 1 else None

    def claim_next(self) -> JobRecord | None:
        """Claim the oldest queued job (FIFO). The dispatcher claims by policy (`queue_heads` + `claim`)."""
        for candidate in self.list_by_status(JobStatus.QUEUED, limit=16):
            claimed = self.claim(candidate.id)
            if claimed is not None:
                return claimed
        return None

    def queue_heads(self) -> list[tuple[str, str, str, float, str]]:
        """(id, tenant, priority, created_at, pool) of each tenant's oldest queued job in each tier and pool:
        all a FIFO-within-tenant policy needs to choose, however long the queue (one grouped query). Heads are
        per pool so a job waiting for a busy (or unplaceable) pool never blocks the same tenant's other work."""
        j = jobs_table
        heads = (
            sa.select(j.c.tenant, j.c.priority, j.c.pool, sa.func.min(j.c.created_at).label("oldest"))
            .where(j.c.status == JobStatus.QUEUED.value)
            .group_by(j.c.tenant, j.c.priority, j.c.pool)
            .subquery()
        )
        query = (
            sa.select(j.c.id, j.c.tenant, j.c.priority, j.c.created_at, j.c.pool)
            .join(
                heads,
                sa.and_(
                    j.c.tenant == heads.c.tenant,
                    j.c.priority == heads.c.priority,
                    j.c.pool == heads.c.pool,
                    j.c.created_at == heads.c.oldest,
                ),
            )
            .where(j.c.status == JobStatus.QUEUED.value)
        )
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def queue_depth(self, pool: str | None = None) -> dict[str, int]:
        """Queued jobs per priority tier (of one pool, or all)."""
        query = (
            sa.select(jobs_table.c.priority, sa.func.count())
            .where(jobs_table.c.status == JobStatus.QUEUED.value)
            .group_by(jobs_table.c.priority)
        )
        if pool is not None:
            query = query.where(jobs_table.c.pool == pool)
        with self.engine.connect() as conn:
            return {tier: int(n) for tier, n in conn.execute(query)}

    def recent_starts(self, since: float) -> list[tuple[str, str]]:
        """(tenant, priority) of jobs started since `since`, oldest first (rebuilds fair-share state)."""
        query = (
            sa.select(jobs_table.c.tenant, jobs_table.c.priority)
            .where(jobs_table.c.started_at >= since)
            .order_by(jobs_table.c.started_at)
        )
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query)]

    def report_progress(self, job_id: str, attempt: int, progress: float) -> StepSignal:
        """Record progress of a running attempt and say whether to go on, stop (cancelled or stale)
        or checkpoint and yield the slot (preemption requested)."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(jobs_table)
                .where(
                    jobs_table.c.id == job_id,
                    jobs_table.c.attempt == attempt,
                    jobs_table.c.status == JobStatus.RUNNING.value,
                )
                .values(progress=min(max(progress, 0.0), 1.0), updated_at=now)
            )
            row = conn.execute(
                sa.select(
                    jobs_table.c.cancel_requested, jobs_table.c.preempt_requested, jobs_table.c.status, jobs_table.c.attempt
                ).where(jobs_table.c.id == job_id)
            ).first()
        if row is None:
            return StepSignal.CANCEL
        cancel_requested, preempt_requested, status, current_attempt = row
        if cancel_requested or status != JobStatus.RUNNING.value or current_attempt != attempt:
            return StepSignal.CANCEL
        return StepSignal.PREEMPT if preempt_requested else StepSignal.CONTINUE

    def request_preempt(self, job_id: str, max_preemptions: int) -> bool:
        """Ask a running job to checkpoint at its next step; refused past `max_preemptions` (no thrash)."""
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {"preempt_requested": True},
            extra=[jobs_table.c.preemptions < max_preemptions, jobs_table.c.cancel_requested.is_(False)],
        )

    def requeue_preempted(self, job_id: str, attempt: int, checkpoint_key: str) -> bool:
        """running -> queued with its checkpoint; it keeps its created_at (and so its place and aging)."""
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {
                "status": JobStatus.QUEUED.value,
                "checkpoint_key": checkpoint_key,
                "preempt_requested": False,
                "preemptions": jobs_table.c.preemptions + 1,
                "started_at": None,
            },
            attempt,
        )

    def request_cancel(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """queued -> cancelled now; running -> flagged, the denoiser stops at its next step.
        A terminal job raises JobStateConflict."""
        job = self.get(job_id, tenant)
        now = time.time()
        if job.status == JobStatus.QUEUED and self._transition(
            job_id, (JobStatus.QUEUED,), {"status": JobStatus.CANCELLED.value, "finished_at": now, "cancel_requested": True}
        ):
            return self.get(job_id)
        if self._transition(job_id, (JobStatus.RUNNING,), {"cancel_requested": True}):
            return self.get(job_id)
        job = self.get(job_id)
        if job.status == JobStatus.QUEUED:  # lost a race with claim -> it is running now; retry once
            return self.request_cancel(job_id, tenant)
        raise JobStateConflict(job_id, job.status, "cancel")

    def complete(self, job_id: str, attempt: int, result: dict[str, Any], retain_s: float | None = None) -> bool:
        """running -> done with its result; its outputs expire `retain_s` after now (None: kept), or at once when
        its owner deleted it meanwhile."""
        now = time.time()
        keep_until = now + retain_s if retain_s is not None else None
        expires_at = sa.case((jobs_table.c.deleted_at.is_not(None), now), else_=keep_until)
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {"status": JobStatus.DONE.value, "result": json.dumps(result), "progress": 1.0, "finished_at": now,
             "expires_at": expires_at},
            attempt,
        )

    def fail(self, job_id: str, attempt: int, error: dict[str, Any]) -> bool:
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {"status": JobStatus.FAILED.value, "error": json.dumps(error), "finished_at": time.time()},
            attempt,
        )

    def retry(self, job_id: str, attempt: int, max_attempts: int) -> bool:
        """running -> queued after an infrastructure failure (a parallel rank died), while the job has had fewer
        than `max_attempts` dispatches; it keeps its created_at and checkpoint. False: fail it instead."""
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {"status": JobStatus.QUEUED.value, "started_at": None, "preempt_requested": False},
            attempt,
            extra=[jobs_table.c.attempt < max_attempts, jobs_table.c.cancel_requested.is_(False)],
        )

    # -- retention (the sweeper: `imagine.storage.retention`) --------------------------------------
    def ended_unswept(self, limit: int, job_id: str | None = None) -> list[JobRecord]:
        """Ended jobs (done, failed, cancelled, expired) whose inputs and work files are not deleted yet."""
        j = jobs_table
        terminal = [st.value for st in JobStatus if st.terminal]
        query = sa.select(j).where(j.c.inputs_purged_at.is_(None), j.c.status.in_(terminal))
        if job_id is not None:
            query = query.where(j.c.id == job_id)
        with self.engine.connect() as conn:
            return [_row_to_record(r) for r in conn.execute(query.order_by(j.c.finished_at).limit(limit))]

    def mark_inputs_purged(self, job_ids: list[str], now: float) -> int:
        j = jobs_table
        with self.engine.begin() as conn:
            return conn.execute(
                sa.update(j).where(j.c.id.in_(job_ids), j.c.inputs_purged_at.is_(None)).values(inputs_purged_at=now)
            ).rowcount

    def outputs_past_retention(self, now: float, limit: int, job_id: str | None = None) -> list[JobRecord]:
        """Done jobs whose outputs expired and are not deleted yet (only `job_id`, when given)."""
        j = jobs_table
        query = sa.select(j).where(
            j.c.outputs_purged_at.is_(None), j.c.expires_at <= now, j.c.status == JobStatus.DONE.value
        )
        if job_id is not None:
            query = query.where(j.c.id == job_id)
        query = query.order_by(j.c.expires_at).limit(limit)
        with self.engine.connect() as conn:
            return [_row_to_record(r) for r in conn.execute(query)]

    def mark_outputs_purged(self, job_ids: list[str], now: float) -> int:
        j = jobs_table
        with self.engine.begin() as conn:
            return conn.execute(
                sa.update(j).where(j.c.id.in_(job_ids), j.c.outputs_purged_at.is_(None)).values(outputs_purged_at=now)
            ).rowcount

    def mark_cancelled(self, job_id: str, attempt: int) -> bool:
        return self._transition(
            job_id, (JobStatus.RUNNING,), {"status": JobStatus.CANCELLED.value, "finished_at": time.time()}, attempt
        )

    def requeue_running(self) -> int:
        """On scheduler start: jobs left running by a dead process go back to the queue
        (a cancel requested meanwhile wins: those end cancelled)."""
        now = time.time()
        with self.engine.begin() as conn:
            cancelled = conn.execute(
                sa.update(jobs_table)
                .where(jobs_table.c.status == JobStatus.RUNNING.value, jobs_table.c.cancel_requested.is_(True))
                .values(status=JobStatus.CANCELLED.value, finished_at=now, updated_at=now)
            ).rowcount
            requeued = conn.execute(
                sa.update(jobs_table)
                .where(jobs_table.c.status == JobStatus.RUNNING.value)
                .values(status=JobStatus.QUEUED.value, progress=0.0, started_at=None, updated_at=now)
            ).rowcount
        del cancelled
        return requeued
