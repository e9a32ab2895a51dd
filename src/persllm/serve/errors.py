"""Errors answered in OpenAI's shape, and what each failure of a generation becomes."""

from __future__ import annotations

import logging
from typing import Any

from persllm.errors import BackendError, PersllmError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param, self.headers = status, kind, code, param, headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON error object."""
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BackendError):
        return ApiError(502, f"the model failed: {exc}", kind="server_error", code="backend_error")
    if isinstance(exc, PersllmError):
        return ApiError(500, str(exc), kind="server_error", code="model_unavailable")
    log.exception("generation failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error")
