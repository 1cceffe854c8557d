"""API errors: every failure the client can cause becomes JSON
``{"error": {"type", "code", "message", "param"}}`` with a 4xx status, never a 500."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """An error with its HTTP status and the request parameter it is about."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "code": self.code, "message": self.message, "param": self.param}}


def unauthorized(code: str, message: str) -> ApiError:
    """401 about the `Authorization` header."""
    return ApiError(401, code, message, "Authorization", "authentication_error", headers={"WWW-Authenticate": "Bearer"})


def rate_limited(code: str, message: str, retry_after_s: float) -> ApiError:
    """429 with `Retry-After` (whole seconds, at least 1); `code` names the limit that was hit."""
    return ApiError(429, code, message, None, "rate_limit_error", headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) if parts else None


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        return ApiError(400, "invalid_json", f"request body is not valid JSON: {first.get('msg')}", "body")
    param = _param_from_loc(tuple(first.get("loc", ())))
    if param is None and first.get("type") == "value_error":  # a rule across fields (its message names them)
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        return ApiError(422, "invalid_parameter", msg, "body")
    if param is None:  # the body as a whole: empty, or not a JSON object
        return ApiError(400, "invalid_json", "request body must be a JSON object", "body")
    if first.get("type") == "missing":
        return ApiError(422, "missing_parameter", f"'{param}' is required", param)
    if first.get("type") == "extra_forbidden":
        return ApiError(422, "unknown_parameter", f"unknown parameter '{param}'", param)
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return ApiError(422, "invalid_parameter", f"'{param}': {msg}", param)


def _http_error(exc: StarletteHTTPException) -> ApiError:
    """The framework's own HTTP errors. Its only 400 is a body it could not read or decode (e.g. bytes that are not
    UTF-8 under a JSON content type), raised `from` the decoding error: that one names the body."""
    if exc.status_code == 400:
        cause = exc.__cause__
        reason = f"{type(cause).__name__}: {cause}" if cause is not None else str(exc.detail)
        code = "invalid_json" if isinstance(cause, ValueError) else "invalid_body"
        return ApiError(400, code, f"the request body could not be read as JSON ({reason})", "body")
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return ApiError(exc.status_code, code, str(exc.detail), None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(_http_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # a bug on our side: still JSON, and the message does not leak internals
        return error_response(ApiError(500, "internal_error", f"internal error ({type(exc).__name__})", None, "server_error"))


# the error statuses every route may answer (OpenAPI `responses`; the JSON error body names the parameter)
ERROR_RESPONSES: dict[int | str, dict[str, str]] = {
    400: {"description": "Bad input (JSON error body names the parameter)"},
    401: {"description": "Missing, unknown or revoked API key"},
    404: {"description": "Unknown id (or another tenant's)"},
    409: {"description": "Conflicting state"},
    413: {"description": "Request body too large (param: body)"},
    422: {"description": "Invalid parameter"},
}
