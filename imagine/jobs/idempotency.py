"""Idempotency-Key records (Stripe / IETF draft semantics): one row per (tenant, key) naming the job the
first request created and a hash of its body. The row is inserted in the same transaction as the job,
so of N concurrent duplicates exactly one inserts; the others hit the unique constraint and read it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from imagine.jobs.migrate import ensure_schema

MAX_KEY_CHARS = 255

idempotency_metadata = sa.MetaData()

idempotency_table = sa.Table(
    "idempotency_keys",
    idempotency_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("key", sa.String(MAX_KEY_CHARS), nullable=False),
    sa.Column("body_hash", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.UniqueConstraint("tenant", "key", name="uq_idempotency_tenant_key"),
    sa.Index("ix_idempotency_expires", "expires_at"),
)


class IdempotencyKeyInUse(Exception):
    """A live record for (tenant, key) exists: the request is a duplicate (or reuses the key for another body)."""

    def __init__(self, tenant: str, key: str):
        super().__init__(f"Idempotency-Key {key!r} of tenant {tenant!r} is in use")
        self.tenant = tenant
        self.key = key


@dataclass(frozen=True)
class IdempotencyRecord:
    tenant: str
    key: str
    body_hash: str
    job_id: str
    created_at: float
    expires_at: float


def body_fingerprint(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a request body (sorted keys, no whitespace)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class IdempotencyStore:
    """Idempotency records next to the jobs (same engine); `reserve` runs inside the job's transaction."""

    def __init__(self, engine: sa.Engine, ttl_s: float):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.engine = engine
        self.ttl_s = ttl_s
        ensure_schema(engine)

    def reserve(self, conn: sa.Connection, tenant: str, key: str, body_hash: str, job_id: str, now: float) -> None:
        """Record `key` -> `job_id` in the caller's transaction. An expired record is forgotten first (expired
        keys can be reused); a live one raises IdempotencyKeyInUse once the transaction that wrote it has
        committed (the unique constraint waits for it), so the caller can read the winner."""
        t = idempotency_table
        conn.execute(sa.delete(t).where(t.c.tenant == tenant, t.c.key == key, t.c.expires_at <= now))
        try:
            conn.execute(
                sa.insert(t).values(
                    tenant=tenant, key=key, body_hash=body_hash, job_id=job_id, created_at=now, expires_at=now + self.ttl_s
                )
            )
        except sa.exc.IntegrityError as e:
            raise IdempotencyKeyInUse(tenant, key) from e

    def get(self, tenant: str, key: str, now: float) -> IdempotencyRecord | None:
        """The live record of (tenant, key), or None (never used, or expired)."""
        t = idempotency_table
        query = sa.select(t).where(t.c.tenant == tenant, t.c.key == key, t.c.expires_at > now)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        m = row._mapping
        return IdempotencyRecord(
            tenant=m["tenant"], key=m["key"], body_hash=m["body_hash"], job_id=m["job_id"],
            created_at=m["created_at"], expires_at=m["expires_at"],
        )

    def purge_expired(self, now: float) -> int:
        """Delete every expired record; returns how many."""
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(idempotency_table).where(idempotency_table.c.expires_at <= now)).rowcount
