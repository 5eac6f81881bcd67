"""Log lines that say which request they are about.

Module loggers on the request path are `RequestLogger`s: each line gets the current request's id
as the `request_id` attribute (`extra`), which JSON log formatters pick up. The id travels in a
context variable, so lines from tasks and worker threads the request starts carry it too. A
leaf: sessions, engines and the HTTP layer all log through it without knowing of each other.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from contextvars import ContextVar, Token
from typing import Any

_request_id: ContextVar[str | None] = ContextVar("chatstream_asgi_request_id", default=None)


class RequestLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A module logger whose lines carry the current request's id as `record.request_id`."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        request_id = _request_id.get()
        if request_id is not None:
            kwargs["extra"] = {**(kwargs.get("extra") or {}), "request_id": request_id}
        return msg, kwargs


def request_logger(name: str) -> RequestLogger:
    """`logging.getLogger(name)`, with the request id added to each line logged during a request."""
    return RequestLogger(logging.getLogger(name), {})


class RequestIdFormatter(logging.Formatter):
    """Plain-text lines that end with `[request <id>]` when they are about a request."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} [request {request_id}]"


def bind_request_id(request_id: str) -> Token[str | None]:
    """Make log lines of the current task (and what it starts) carry `request_id`."""
    return _request_id.set(request_id)


def unbind_request_id(token: Token[str | None]) -> None:
    """Undo `bind_request_id`."""
    _request_id.reset(token)
