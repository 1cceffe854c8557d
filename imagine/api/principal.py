"""Who is calling, as a value: a `Principal` (tenant, key, tier, limits). A leaf module: the service, the routes and
`auth` (which makes principals from `Authorization` headers) all import it, and it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass

from imagine.config import TIERS, AuthConfig, KeyLimits

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    """The caller of one request."""

    tenant: str
    key_id: str | None  # None when auth is off
    tier: str  # the highest priority this caller may use
    limits: KeyLimits

    def cap_priority(self, requested: str) -> str:
        """`requested`, lowered to this caller's tier when it is higher (TIERS is highest first)."""
        return TIERS[max(TIERS.index(requested), TIERS.index(self.tier))]


def local_principal(auth: AuthConfig) -> Principal:
    """Everyone, when auth is off (the localhost development server)."""
    return Principal(tenant=DEFAULT_TENANT, key_id=None, tier=TIERS[0], limits=auth.default_limits)


def effective_limits(key_limits: KeyLimits, defaults: KeyLimits) -> KeyLimits:
    """A key's own limits, each unset one taken from `auth.default_limits`."""
    return KeyLimits.model_validate({**defaults.model_dump(exclude_none=True), **key_limits.model_dump(exclude_none=True)})
