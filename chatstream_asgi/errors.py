"""The errors a client can cause, and the one place they become HTTP.

Every refusal the package gives (bad JSON, a full queue, a store that is down) is a
`ChatStreamError` subclass carrying its status and the `error` code of DESIGN's table.
`error_body` and `send_error` are the only builders of error JSON, so the shape
`{"error": code, "detail": text}` cannot drift between the middleware and the endpoint path.
"""

from __future__ import annotations

import json
import math

from starlette.responses import JSONResponse
from starlette.types import Send


def quoted(value: object, limit: int = 64) -> str:
    """`repr(value)` cut to `limit` characters: an error may name what the client sent, but never
    echo an unbounded amount of it back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ChatStreamError(Exception):
    """A request the server refuses, with the HTTP status and machine-readable code to say so."""

    status_code: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def headers(self) -> dict[str, str]:
        """Extra response headers this refusal carries."""
        return {}


class InvalidJSON(ChatStreamError):
    """The body is not UTF-8 JSON, or not a JSON object."""

    status_code = 400
    code = "invalid_json"


class InvalidRequest(ChatStreamError):
    """A field is missing or has the wrong type."""

    status_code = 400
    code = "invalid_request"


class NothingToRegenerate(ChatStreamError):
    """`regenerate: true` in a session that has no reply to replace."""

    status_code = 400
    code = "nothing_to_regenerate"


class Unauthorized(ChatStreamError):
    """`api_keys` are set and the request has no valid `Authorization: Bearer` key."""

    status_code = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ChatStreamError):
    """The client may not call this: its role (`client_roles`) does not allow the API, or its
    bearer key lacks the scope the route needs (`chat`, `apis`, `admin`)."""

    status_code = 403
    code = "forbidden"


class NotFound(ChatStreamError):
    """The thing named (a message id, a model) does not exist."""

    status_code = 404
    code = "not_found"


class SessionBusy(ChatStreamError):
    """A turn of this session is already queued or running."""

    status_code = 409
    code = "session_busy"


class BodyTooLarge(ChatStreamError):
    """The request body is over the middleware's `max_body_size`."""

    status_code = 413
    code = "body_too_large"


class BodyTimeout(ChatStreamError):
    """The request body did not fully arrive within the middleware's `body_timeout`."""

    status_code = 408
    code = "body_timeout"


class GenerationError(ChatStreamError):
    """The engine failed before any of the reply was sent: 500 for a local model, 502 for an
    upstream server that failed or cannot be reached, 504 for one that did not answer in time."""

    code = "generation_failed"

    def __init__(self, detail: str, status_code: int) -> None:
        super().__init__(detail)
        self.status_code = status_code


class InvalidParameter(ChatStreamError):
    """A generation parameter is out of range or of the wrong type; `field` names it."""

    status_code = 422
    code = "invalid_parameter"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field


class RetryLater(ChatStreamError):
    """A refusal that says when to come back: `Retry-After`, whole seconds, at least 1."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class TooManyRequests(RetryLater):
    """Every slot is busy and the wait queue is full."""

    status_code = 429
    code = "too_many_requests"


class QueueTimeout(RetryLater):
    """The request waited for a slot past its deadline (`max_queue_wait`, `X-ChatStream-Deadline`)."""

    status_code = 503
    code = "queue_timeout"


class SessionStoreUnavailable(ChatStreamError):
    """The session store did not answer in time, or is down."""

    status_code = 503
    code = "session_store_unavailable"


class SessionValueNotStorable(ChatStreamError):
    """An app put a value in the session that JSON cannot hold (the store keeps JSON only)."""

    status_code = 500
    code = "session_value_not_storable"


class ShuttingDown(ChatStreamError):
    """The server is stopping: it takes no new chats, and cuts short those it could not finish."""

    status_code = 503
    code = "shutting_down"


def error_body(error: ChatStreamError, *, chatstream_shape: bool = False) -> dict[str, object]:
    """The JSON object sent for `error`.

    `chatstream_shape` adds ChatStream's `{"success": false, "message": ...}` keys, which its
    conversation APIs answer with and its front-ends read.
    """
    body: dict[str, object] = {"success": False, "message": error.detail} if chatstream_shape else {}
    body |= {"error": error.code, "detail": error.detail}
    if isinstance(error, InvalidParameter):
        body["field"] = error.field
    if isinstance(error, RetryLater):
        body["retry_after"] = error.retry_after
    return body


def error_response(
    error: ChatStreamError, *, status_code: int | None = None, chatstream_shape: bool = False
) -> JSONResponse:
    """A Starlette response for `error`; `status_code` overrides the status (ChatStream's 200 mode)."""
    return JSONResponse(
        error_body(error, chatstream_shape=chatstream_shape),
        status_code=error.status_code if status_code is None else status_code,
        headers=error.headers(),
    )


async def send_error(send: Send, error: ChatStreamError, *, chatstream_shape: bool = False) -> None:
    """Answer with `error` on a raw ASGI `send`, for refusals made before any app runs."""
    payload = json.dumps(error_body(error, chatstream_shape=chatstream_shape)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
