"""Errors as HTTP answers: OpenAI's body `{"error": {"message", "type", "param", "code"}}` on the OpenAI
routes and everywhere else, text-generation-inference's `{"error", "error_type"}` on its routes."""

from __future__ import annotations

from typing import Any

from idefics2.serving import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    RequestTooLargeError,
)

_TGI_ERROR_TYPES = dict.fromkeys((400, 413, 415, 422), "validation") | {429: "overloaded"}


class APIError(Exception):
    """One failed request: HTTP status, message, OpenAI error type, the request field at fault, a code."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def tgi_body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": _TGI_ERROR_TYPES.get(self.status, "generation")}


def engine_error(error: Exception) -> APIError:
    """The answer to an exception raised while submitting or running a request."""
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, RequestTooLargeError):
        return APIError(400, message, code="context_length_exceeded")
    if isinstance(error, EngineOverloadedError):
        return APIError(429, message, type="server_overloaded", code="overloaded")
    if isinstance(error, EngineDeadError):  # the process is about to exit for its supervisor to restart it
        return APIError(503, message, type="server_unavailable", code="engine_dead")
    if isinstance(error, EngineClosedError):
        return APIError(503, message, type="server_unavailable", code="shutting_down")
    if isinstance(error, (ValueError, TypeError)):
        return APIError(400, message)
    if isinstance(error, RequestFailedError):
        return APIError(500, message, type="server_error", code="generation_failed")
    return APIError(500, f"{type(error).__name__}: {message}", type="server_error")
