"""Errors in OpenAI's shape: our own (`ApiError`), and the body a stream
ends with when a request fails after its response began."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

RETRY_AFTER_S = 2
"""`Retry-After` of a 503: Serve restarts a dead replica within seconds,
and placement moves a session off an instance that stays down."""


class ApiError(Exception):
    """An OpenAI-shaped error response of our own."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def unavailable(message: str) -> ApiError:
    """A 503 the client may retry (the session's record is as before the turn)."""
    return ApiError(
        503,
        message,
        kind="service_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def in_band(exc: Exception) -> dict[str, Any]:
    """The error event of a stream whose status line has gone out: ours, or
    vLLM's mapping of its own and Python's errors, as `vllm serve` sends it."""
    if isinstance(exc, ApiError):
        return exc.body()
    return create_error_response(exc).model_dump()
