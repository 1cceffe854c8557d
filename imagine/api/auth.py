"""Who is calling: `Authorization: Bearer <key>` -> a `Principal` (tenant, key, tier, limits).
Routes take it with `Depends(principal_dependency(keys, auth))`; with `auth.enabled: false` every request is the
local principal: tenant "default", tier "realtime"."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from imagine.api.errors import unauthorized
from imagine.api.principal import Principal, effective_limits, local_principal
from imagine.config import AuthConfig
from imagine.jobs.keys import KeyStore

# registers the bearer scheme in the OpenAPI docs; errors are ours (JSON, param "Authorization")
_BEARER = Security(HTTPBearer(auto_error=False, description="An API key from `imagine keys create`."))


def authenticate(keys: KeyStore, auth: AuthConfig, authorization: str | None) -> Principal:
    """The principal of an `Authorization` header value; 401 (param "Authorization") when it is missing,
    malformed, unknown or revoked."""
    if not auth.enabled:
        return local_principal(auth)
    if not authorization:
        raise unauthorized("missing_api_key", "this route needs an API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("invalid_authorization", "the Authorization header must be 'Bearer <key>'")
    record = keys.lookup(token)
    if record is None:
        raise unauthorized("invalid_api_key", "the API key is not valid")
    if record.revoked:
        raise unauthorized("revoked_api_key", f"the API key {record.prefix}... was revoked")
    return Principal(
        tenant=record.tenant, key_id=record.id, tier=record.tier,
        limits=effective_limits(record.limits, auth.default_limits),
    )


def principal_dependency(keys: KeyStore, auth: AuthConfig) -> Callable[..., Principal]:
    """A FastAPI dependency resolving the caller of a request against `keys` (`Depends(...)` in any router)."""

    def require_principal(
        request: Request, _credentials: HTTPAuthorizationCredentials | None = _BEARER
    ) -> Principal:
        return authenticate(keys, auth, request.headers.get("authorization"))

    return require_principal
