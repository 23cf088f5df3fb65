"""OpenAI-style errors raised inside the proxy and their JSON bodies.

Body shape (OpenAI API reference, "Error codes"):
``{"error": {"message": str, "type": str, "code": str | None, "param": str | None}}``.
Clients map the status code to exception classes (openai SDK: 400 BadRequestError,
404 NotFoundError, ...). litellm additionally maps a 400 whose message mentions the
context length to ``ContextWindowExceededError``, which mini-swe-agent treats as
fatal (it is in ``LitellmModel.abort_exceptions``), so the agent stops instead of
retrying.
"""

from __future__ import annotations

from typing import Any


class ProxyError(Exception):
    """An error answered to the agent as an OpenAI-style JSON error.

    Attributes:
        status: HTTP status code (4xx for client errors, 5xx for backend failures).
        message: human-readable text.
        type: OpenAI error type (``invalid_request_error``, ``server_error``...).
        code: machine-readable code (``history_mismatch``, ``context_length_exceeded``...).
        param: the request field at fault, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)


def error_body(
    message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI error JSON object."""
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


# Unknown session, closed session and wrong/missing API key all get exactly this
# error, so a client cannot probe which session ids exist.
SESSION_NOT_FOUND_MESSAGE = "The session does not exist, is closed, or the API key is not valid for it."


def session_not_found() -> ProxyError:
    return ProxyError(404, SESSION_NOT_FOUND_MESSAGE, code="session_not_found")


def context_length_exceeded(detail: str) -> ProxyError:
    # The phrase "context length" makes litellm raise ContextWindowExceededError.
    return ProxyError(
        400,
        f"This model's maximum context length is exceeded: {detail} (context length exceeded)",
        code="context_length_exceeded",
        param="messages",
    )


def history_mismatch(detail: str) -> ProxyError:
    return ProxyError(
        400,
        f"The conversation history does not extend the recorded one: {detail}",
        code="history_mismatch",
        param="messages",
    )
