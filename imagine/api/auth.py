"""Who is calling: `Authorization: Bearer <key>` -> a `Principal` (tenant, key, tier, limits).
Routes take it with `Depends(require_principal)` (or a dependency built by `principal_dependency(service)`);
with `auth.enabled: false` every request is the local principal: tenant "default", tier "realtime"."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from imagine.api.errors import unauthorized
from imagine.config import TIERS, AuthConfig, KeyLimits

if TYPE_CHECKING:
    from imagine.api.service import JobService

DEFAULT_TENANT = "default"

# registers the bearer scheme in the OpenAPI docs; errors are ours (JSON, param "Authorization")
_BEARER = Security(HTTPBearer(auto_error=False, description="An API key from `imagine keys create`."))


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


def authenticate(service: JobService, authorization: str | None) -> Principal:
    """The principal of an `Authorization` header value; 401 (param "Authorization") when it is missing,
    malformed, unknown or revoked."""
    auth = service.config.auth
    if not auth.enabled:
        return local_principal(auth)
    if not authorization:
        raise unauthorized("missing_api_key", "this route needs an API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("invalid_authorization", "the Authorization header must be 'Bearer <key>'")
    record = service.keys.lookup(token)
    if record is None:
        raise unauthorized("invalid_api_key", "the API key is not valid")
    if record.revoked:
        raise unauthorized("revoked_api_key", f"the API key {record.prefix}... was revoked")
    return Principal(
        tenant=record.tenant, key_id=record.id, tier=record.tier,
        limits=effective_limits(record.limits, auth.default_limits),
    )


def principal_dependency(service: JobService) -> Callable[..., Principal]:
    """A FastAPI dependency resolving the caller against `service` (for routers built around a service)."""

    def require_principal(
        request: Request, _credentials: HTTPAuthorizationCredentials | None = _BEARER
    ) -> Principal:
        return authenticate(service, request.headers.get("authorization"))

    return require_principal


def require_principal(
    request: Request, _credentials: HTTPAuthorizationCredentials | None = _BEARER
) -> Principal:
    """`Depends(require_principal)` in any route of an app built by `create_api` (its service is in `app.state`)."""
    return authenticate(request.app.state.job_service, request.headers.get("authorization"))
