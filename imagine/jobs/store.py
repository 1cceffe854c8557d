"""Durable job state on SQLAlchemy Core: SQLite (WAL) by default, PostgreSQL in a cluster.

Every state change is one conditional UPDATE (``... WHERE status = <expected>``), so concurrent
ingress replicas, the scheduler and stage replicas never overwrite each other's transitions, and a
rejected request never touches a stored row. A job's ``attempt`` counts dispatches; results of a
stale attempt (a worker that outlived a restart) are ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

metadata = sa.MetaData()

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
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("result", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Index("ix_jobs_status_created", "status", "created_at"),
    sa.Index("ix_jobs_tenant_created", "tenant", "created_at"),
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
    kind: str
    model: str
    priority: str
    status: JobStatus
    params: dict[str, Any]
    progress: float
    cancel_requested: bool
    attempt: int
    error: dict[str, Any] | None
    result: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


@dataclass
class NewJob:
    kind: str
    model: str
    params: dict[str, Any]
    tenant: str = "default"
    priority: str = "standard"
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


def _row_to_record(row: sa.Row) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"],
        tenant=m["tenant"],
        kind=m["kind"],
        model=m["model"],
        priority=m["priority"],
        status=JobStatus(m["status"]),
        params=json.loads(m["params"]),
        progress=float(m["progress"]),
        cancel_requested=bool(m["cancel_requested"]),
        attempt=int(m["attempt"]),
        error=json.loads(m["error"]) if m["error"] else None,
        result=json.loads(m["result"]) if m["result"] else None,
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        updated_at=m["updated_at"],
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
        def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001 - DBAPI callback
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


class JobStore:
    """Jobs as rows; all transitions are atomic conditional updates."""

    def __init__(self, url: str, engine: sa.Engine | None = None):
        self.url = url
        self.engine = engine or make_engine(url)
        metadata.create_all(self.engine)

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

    def count_by_status(self) -> dict[str, int]:
        query = sa.select(jobs_table.c.status, sa.func.count()).group_by(jobs_table.c.status)
        with self.engine.connect() as conn:
            return {status: int(n) for status, n in conn.execute(query)}

    # -- writes ----------------------------------------------------------------------------
    def create(self, job: NewJob) -> JobRecord:
        now = time.time()
        values = dict(
            id=job.id,
            tenant=job.tenant,
            kind=job.kind,
            model=job.model,
            priority=job.priority,
            status=JobStatus.QUEUED.value,
            params=json.dumps(job.params, sort_keys=True),
            progress=0.0,
            cancel_requested=False,
            attempt=0,
            created_at=now,
            updated_at=now,
        )
        with self.engine.begin() as conn:
            conn.execute(sa.insert(jobs_table).values(**values))
        return self.get(job.id)

    def _transition(
        self, job_id: str, expected: tuple[JobStatus, ...], values: dict[str, Any], attempt: int | None = None
    ) -> bool:
        cond = [jobs_table.c.id == job_id, jobs_table.c.status.in_([s.value for s in expected])]
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
                    progress=0.0,
                    attempt=jobs_table.c.attempt + 1,
                )
            ).rowcount
        return self.get(job_id) if updated == 1 else None

    def claim_next(self) -> JobRecord | None:
        """Claim the oldest queued job (FIFO); the scheduling issue replaces the order, not this shape."""
        for candidate in self.list_by_status(JobStatus.QUEUED, limit=16):
            claimed = self.claim(candidate.id)
            if claimed is not None:
                return claimed
        return None

    def report_progress(self, job_id: str, attempt: int, progress: float) -> bool:
        """Record progress of a running attempt; returns True when a cancel was requested."""
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
                sa.select(jobs_table.c.cancel_requested, jobs_table.c.status, jobs_table.c.attempt).where(
                    jobs_table.c.id == job_id
                )
            ).first()
        if row is None:
            return True
        cancel_requested, status, current_attempt = row
        return bool(cancel_requested) or status != JobStatus.RUNNING.value or current_attempt != attempt

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

    def complete(self, job_id: str, attempt: int, result: dict[str, Any]) -> bool:
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {"status": JobStatus.DONE.value, "result": json.dumps(result), "progress": 1.0, "finished_at": time.time()},
            attempt,
        )

    def fail(self, job_id: str, attempt: int, error: dict[str, Any]) -> bool:
        return self._transition(
            job_id,
            (JobStatus.RUNNING,),
            {"status": JobStatus.FAILED.value, "error": json.dumps(error), "finished_at": time.time()},
            attempt,
        )

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
