"""API keys: who a request is (tenant), the highest priority it may ask for (tier) and its admission
limits. Only a SHA-256 hash and a short visible prefix of a key are stored; the key itself is shown once."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from imagine.config import TIERS, KeyLimits
from imagine.jobs.migrate import ensure_schema

KEY_PREFIX = "im_"
_VISIBLE_CHARS = 6  # "im_ab12cd": enough to tell keys apart in `imagine keys list`, useless to an attacker

keys_metadata = sa.MetaData()

api_keys_table = sa.Table(
    "api_keys",
    keys_metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("prefix", sa.String(32), nullable=False, unique=True),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("limits", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=True),
)


class ApiKeyNotFound(KeyError):
    """No API key with this prefix or id."""


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    prefix: str
    tenant: str
    tier: str
    limits: KeyLimits  # only the limits set on the key; unset ones fall back to `auth.default_limits`
    created_at: float
    revoked_at: float | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _row_to_record(row: sa.Row) -> ApiKeyRecord:
    m = row._mapping
    return ApiKeyRecord(
        id=m["id"], prefix=m["prefix"], tenant=m["tenant"], tier=m["tier"],
        limits=KeyLimits.model_validate(json.loads(m["limits"])),
        created_at=m["created_at"], revoked_at=m["revoked_at"],
    )


class KeyStore:
    """API keys as rows, next to the jobs (same engine)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine
        ensure_schema(engine)

    def create(self, tenant: str, tier: str, limits: KeyLimits | None = None) -> tuple[str, ApiKeyRecord]:
        """A new key for `tenant`; returns (the key, its record). The key is not stored and cannot be shown again."""
        if not tenant or len(tenant) > 128:
            raise ValueError(f"tenant must be 1-128 characters, got {tenant!r}")
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        limits_json = (limits or KeyLimits()).model_dump_json(exclude_none=True)
        for _ in range(5):  # a prefix collision (36 random bits) just draws a new key
            key = KEY_PREFIX + secrets.token_urlsafe(32)
            values = {
                "id": str(uuid.uuid4()), "prefix": key[: len(KEY_PREFIX) + _VISIBLE_CHARS], "hash": hash_key(key),
                "tenant": tenant, "tier": tier, "limits": limits_json, "created_at": time.time(), "revoked_at": None,
            }
            try:
                with self.engine.begin() as conn:
                    conn.execute(sa.insert(api_keys_table).values(**values))
            except sa.exc.IntegrityError:
                continue
            return key, self.get(values["id"])
        raise RuntimeError("could not draw an API key with an unused prefix in 5 tries")

    def get(self, prefix_or_id: str) -> ApiKeyRecord:
        t = api_keys_table
        query = sa.select(t).where(sa.or_(t.c.id == prefix_or_id, t.c.prefix == prefix_or_id))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise ApiKeyNotFound(prefix_or_id)
        return _row_to_record(row)

    def lookup(self, key: str) -> ApiKeyRecord | None:
        """The record of a presented key (revoked ones included), or None when it is unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys_table).where(api_keys_table.c.hash == hash_key(key))).first()
        return _row_to_record(row) if row is not None else None

    def list(self) -> list[ApiKeyRecord]:
        t = api_keys_table
        with self.engine.connect() as conn:
            return [_row_to_record(r) for r in conn.execute(sa.select(t).order_by(t.c.created_at, t.c.id))]

    def revoke(self, prefix_or_id: str) -> ApiKeyRecord:
        """Revoke a key now (a key already revoked keeps its first revocation time)."""
        record = self.get(prefix_or_id)
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(api_keys_table)
                .where(api_keys_table.c.id == record.id, api_keys_table.c.revoked_at.is_(None))
                .values(revoked_at=time.time())
            )
        return self.get(record.id)
