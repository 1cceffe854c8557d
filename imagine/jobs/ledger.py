"""Usage ledger: what each job cost us (device time per stage attempt) and what we charge for it
(output seconds of done jobs), exactly once, in the job store's database.

Every write is ``INSERT ... ON CONFLICT DO NOTHING`` on a natural key, so a retried call, a duplicate
completion or a replay after a restart adds nothing: `usage_ledger` is unique on (job, stage,
attempt), `billing` on the job. Cost and price are computed when the row is written and stored, so a
later price-list change never rewrites history.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from imagine.config import AccountingConfig
from imagine.jobs.migrate import ensure_schema
from imagine.jobs.store import JobRecord, JobStatus, JobStore, jobs_table, metadata

GroupBy = Literal["day", "model", "tier"]
GROUP_BY: tuple[str, ...] = ("day", "model", "tier")

usage_table = sa.Table(
    "usage_ledger",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("resolution", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(32), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("device_type", sa.String(16), nullable=False),
    sa.Column("devices", sa.Integer, nullable=False),
    sa.Column("wall_s", sa.Float, nullable=False),
    sa.Column("device_seconds", sa.Float, nullable=False),
    sa.Column("cost_usd", sa.Float, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),  # UTC date of created_at: a portable GROUP BY key
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("job_id", "stage", "attempt", name="uq_usage_job_stage_attempt"),
    sa.Index("ix_usage_tenant_created", "tenant", "created_at"),
)

billing_table = sa.Table(
    "billing",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),  # one price per job, ever
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("resolution", sa.String(16), nullable=False),
    sa.Column("output_seconds", sa.Float, nullable=False),
    sa.Column("price_usd", sa.Float, nullable=False),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Index("ix_billing_tenant_created", "tenant", "created_at"),
)


def utc_day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()


def device_type_of(device: str) -> str:
    """`cuda:1` -> `cuda`; `cpu` -> `cpu`."""
    return device.split(":", 1)[0]


def _job_columns(job: JobRecord, now: float) -> dict[str, Any]:
    """The columns every ledger and billing row carries about its job, stamped at `now`."""
    return {
        "job_id": job.id,
        "tenant": job.tenant,
        "model": job.model,
        "tier": job.priority,
        "resolution": job.params.resolution,
        "day": utc_day(now),
        "created_at": now,
    }


class Ledger:
    """Exactly-once cost and price rows next to the jobs they are about (same engine, same metadata)."""

    def __init__(self, engine: sa.Engine, accounting: AccountingConfig):
        if engine.dialect.name not in ("sqlite", "postgresql"):
            raise ValueError(f"the ledger supports sqlite and postgresql, not {engine.dialect.name!r}")
        self.engine = engine
        self.accounting = accounting
        ensure_schema(engine)

    def _insert_ignore(self, table: sa.Table, values: dict[str, Any], conflict_cols: list[str]) -> bool:
        """INSERT ... ON CONFLICT DO NOTHING; True when the row is new."""
        insert = sqlite.insert if self.engine.dialect.name == "sqlite" else postgresql.insert
        stmt = insert(table).values(**values).on_conflict_do_nothing(index_elements=conflict_cols)
        # RETURNING, not rowcount: with an implicit RETURNING of the key, psycopg reports rowcount -1
        stmt = stmt.returning(*[table.c[col] for col in conflict_cols])
        with self.engine.begin() as conn:
            return conn.execute(stmt).first() is not None

    # -- writes ----------------------------------------------------------------------------
    def record(
        self,
        job: JobRecord,
        stage: str,
        wall_s: float,
        device: str,
        devices: int = 1,
        attempt: int | None = None,
        at: float | None = None,
    ) -> bool:
        """One stage run of one attempt of `job` on `devices` x `device` (`cpu`, `cuda`, `cuda:0`, ...)
        for `wall_s` seconds. False when this (job, stage, attempt) is already recorded."""
        device_type = device_type_of(device)
        if device_type not in self.accounting.device_hour_usd:
            raise ValueError(
                f"device type {device_type!r} has no price in accounting.device_hour_usd "
                f"({sorted(self.accounting.device_hour_usd)})"
            )
        if wall_s < 0:
            raise ValueError(f"wall_s must be >= 0, got {wall_s}")
        if devices < 1:
            raise ValueError(f"devices must be >= 1, got {devices}")
        attempt = job.attempt if attempt is None else attempt
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1 (job {job.id} was never claimed), got {attempt}")
        device_seconds = wall_s * devices
        now = time.time() if at is None else at
        values = {
            **_job_columns(job, now),
            "stage": stage,
            "attempt": attempt,
            "device_type": device_type,
            "devices": devices,
            "wall_s": wall_s,
            "device_seconds": device_seconds,
            "cost_usd": device_seconds * self.accounting.device_hour_usd[device_type] / 3600.0,
        }
        return self._insert_ignore(usage_table, values, ["job_id", "stage", "attempt"])

    def price_usd(self, model: str, resolution: str, output_seconds: float) -> float:
        try:
            per_second = self.accounting.price_per_second_usd[model][resolution]
        except KeyError as e:
            raise ValueError(
                f"no price for model {model!r} at resolution {resolution!r} in accounting.price_per_second_usd"
            ) from e
        return output_seconds * per_second

    def bill(self, job: JobRecord, output_seconds: float, at: float | None = None) -> bool:
        """Charge a done job for its output seconds, once: False when it is already billed.
        The job must be done in the store (failed / cancelled / expired jobs are never charged)."""
        with self.engine.connect() as conn:
            status = conn.execute(sa.select(jobs_table.c.status).where(jobs_table.c.id == job.id)).scalar()
        if status != JobStatus.DONE.value:
            raise ValueError(f"job {job.id} is {status}; only done jobs are billed")
        if output_seconds < 0:
            raise ValueError(f"output_seconds must be >= 0, got {output_seconds}")
        now = time.time() if at is None else at
        columns = _job_columns(job, now)
        values = {
            **columns,
            "output_seconds": output_seconds,
            "price_usd": self.price_usd(job.model, columns["resolution"], output_seconds),
        }
        return self._insert_ignore(billing_table, values, ["job_id"])

    def bill_missing(self, store: JobStore, limit: int = 1000) -> int:
        """Bill done jobs that have no billing row (the process died between `complete` and `bill`),
        from their stored result's `duration_s`. Run on scheduler start; returns how many it billed."""
        query = (
            sa.select(jobs_table.c.id)
            .outerjoin(billing_table, billing_table.c.job_id == jobs_table.c.id)
            .where(jobs_table.c.status == JobStatus.DONE.value, billing_table.c.job_id.is_(None))
            .limit(limit)
        )
        with self.engine.connect() as conn:
            job_ids = list(conn.execute(query).scalars())
        billed = 0
        for job_id in job_ids:
            job = store.get(job_id)
            billed += self.bill(job, float((job.result or {}).get("duration_s", 0.0)), at=job.finished_at)
        return billed

    # -- reads -----------------------------------------------------------------------------
    def job_usage(self, job: JobRecord) -> dict[str, float]:
        """{output_seconds, device_seconds, cost_usd, price_usd} of one job; price and output seconds
        only for a done (and billed) job."""
        with self.engine.connect() as conn:
            device_seconds, cost = conn.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(usage_table.c.device_seconds), 0.0),
                    sa.func.coalesce(sa.func.sum(usage_table.c.cost_usd), 0.0),
                ).where(usage_table.c.job_id == job.id)
            ).one()
            billed = conn.execute(
                sa.select(billing_table.c.output_seconds, billing_table.c.price_usd).where(
                    billing_table.c.job_id == job.id
                )
            ).first()
        output_seconds, price = billed if billed is not None and job.status == JobStatus.DONE else (0.0, 0.0)
        return {
            "output_seconds": float(output_seconds),
            "device_seconds": float(device_seconds),
            "cost_usd": float(cost),
            "price_usd": float(price),
        }

    def usage(self, tenant: str, start: float, end: float, group_by: GroupBy = "day") -> list[dict[str, Any]]:
        """One row per group of `tenant`'s usage with `start <= created_at < end` (unix seconds):
        {group, jobs, output_seconds, device_seconds, cost_usd, price_usd}, ordered by group.
        Cost counts when the device time was spent, price when the job was billed."""
        if group_by not in GROUP_BY:
            raise ValueError(f"group_by must be one of {GROUP_BY}, got {group_by!r}")
        key = {"day": "day", "model": "model", "tier": "tier"}[group_by]
        zero = sa.cast(sa.literal(0.0), sa.Float)
        costs = sa.select(
            usage_table.c[key].label("grp"),
            usage_table.c.job_id,
            zero.label("output_seconds"),
            usage_table.c.device_seconds,
            usage_table.c.cost_usd,
            zero.label("price_usd"),
        ).where(usage_table.c.tenant == tenant, usage_table.c.created_at >= start, usage_table.c.created_at < end)
        prices = sa.select(
            billing_table.c[key].label("grp"),
            billing_table.c.job_id,
            billing_table.c.output_seconds,
            zero.label("device_seconds"),
            zero.label("cost_usd"),
            billing_table.c.price_usd,
        ).where(billing_table.c.tenant == tenant, billing_table.c.created_at >= start, billing_table.c.created_at < end)
        rows = sa.union_all(costs, prices).subquery()
        query = (
            sa.select(
                rows.c.grp,
                sa.func.count(sa.distinct(rows.c.job_id)),
                sa.func.sum(rows.c.output_seconds),
                sa.func.sum(rows.c.device_seconds),
                sa.func.sum(rows.c.cost_usd),
                sa.func.sum(rows.c.price_usd),
            )
            .group_by(rows.c.grp)
            .order_by(rows.c.grp)
        )
        with self.engine.connect() as conn:
            return [
                {
                    "group": grp,
                    "jobs": int(jobs),
                    "output_seconds": float(out),
                    "device_seconds": float(dev),
                    "cost_usd": float(cost),
                    "price_usd": float(price),
                }
                for grp, jobs, out, dev, cost, price in conn.execute(query)
            ]

    def _sums(self, key: sa.Column, first: sa.Column, second: sa.Column) -> dict[str, tuple[float, float]]:
        query = sa.select(key, sa.func.sum(first), sa.func.sum(second)).group_by(key)
        with self.engine.connect() as conn:
            return {k: (float(x), float(y)) for k, x, y in conn.execute(query)}

    def totals_by_device_type(self) -> dict[str, tuple[float, float]]:
        """{device_type: (device_seconds, cost_usd)} over the whole ledger (for /metrics)."""
        return self._sums(usage_table.c.device_type, usage_table.c.device_seconds, usage_table.c.cost_usd)

    def billed_totals_by_model(self) -> dict[str, tuple[float, float]]:
        """{model: (output_seconds, price_usd)} over all billed jobs (for /metrics)."""
        return self._sums(billing_table.c.model, billing_table.c.output_seconds, billing_table.c.price_usd)
