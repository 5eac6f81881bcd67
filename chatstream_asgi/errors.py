"""The errors a client can cause: one small hierarchy, one table of codes (DESIGN §3).

Every refusal the package gives (bad JSON, a full queue, a store that is down) is a
`ChatStreamError` subclass carrying its status and the `error` code of DESIGN's table. A leaf
with no HTTP library in it: the console and the engines raise these too, and
`chatstream_asgi.asgi.http_errors` is the one place they become HTTP responses.
"""

from __future__ import annotations

import math


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


class MethodNotAllowed(ChatStreamError):
    """A route the middleware serves, asked with a method it does not answer (`GET /chat_stream`)."""

    status_code = 405
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: str) -> None:
        super().__init__(f"{method} {path} is not served here: use {allowed}")
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}


class UnsupportedMediaType(ChatStreamError):
    """A route that must be called with a JSON body's `Content-Type` was not (a cross-site form)."""

    status_code = 415
    code = "unsupported_media_type"


class NotSupported(ChatStreamError):
    """What was asked needs something this deployment does not have (say which, and how to add it)."""

    status_code = 501
    code = "not_supported"


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
    upstream server that failed or cannot be reached, 504 for one that did not answer in time.

    An upstream that is busy (429) is passed on as what it is to the client, 429
    `too_many_requests`, with the upstream's `Retry-After` (`retry_after` seconds; 1 when it
    sent none), so a client retries a busy front as it retries a busy server.
    """

    code = "generation_failed"

    def __init__(self, detail: str, status_code: int, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        if status_code == 429:
            self.code = TooManyRequests.code
            retry_after = 1 if retry_after is None else retry_after
        #: Whole seconds, at least 1, for `Retry-After`; None: the failure says nothing of when.
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


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


class SessionBusy(RetryLater):
    """A turn of this session is already queued or running, here or on another replica, or its
    replica died mid-turn and its lock has not expired yet (a few seconds): `Retry-After` says
    when to try again."""

    status_code = 409
    code = "session_busy"

    def __init__(self, detail: str, retry_after: float = 1.0) -> None:
        super().__init__(detail, retry_after)


class SessionStoreUnavailable(RetryLater):
    """The session store did not answer in time, or is down (a restart): nothing was done, and
    `Retry-After` says when to try again."""

    status_code = 503
    code = "session_store_unavailable"

    def __init__(self, detail: str, retry_after: float = 1.0) -> None:
        super().__init__(detail, retry_after)


class SessionValueNotStorable(ChatStreamError):
    """An app put a value in the session that JSON cannot hold (the store keeps JSON only)."""

    status_code = 500
    code = "session_value_not_storable"


class ShuttingDown(ChatStreamError):
    """The server is stopping: it takes no new chats, and cuts short those it could not finish."""

    status_code = 503
    code = "shutting_down"
