"""How a reply is framed on the wire (DESIGN §4): delta text, ChatStream's cumulative chunks, SSE.

SSE frames follow sse-starlette's conventions (`\\r\\n` line ends, a blank line ends an event,
`: ping` comments to keep proxies from timing out); the delta is JSON-encoded, so a reply
with newlines is still a single `data:` line. `sse_event` is the one SSE framer: `/v1` frames
with it too, with OpenAI's own `\\n` line ends, which its clients and tests of theirs expect.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from starlette.datastructures import Headers, QueryParams
from starlette.types import Scope

StreamFormat = Literal["delta", "chatstream", "sse"]
STREAM_FORMATS: tuple[StreamFormat, ...] = ("delta", "chatstream", "sse")

#: ChatStream's end-of-chunk marker: front-ends split merged chunks on it.
CHATSTREAM_EOS = "<::EOS::>"


class WireEncoder:
    """Delta text: each chunk is the new text, and the chunks concatenate to the reply."""

    media_type = "text/plain; charset=utf-8"
    #: Whether a reply the server cuts short (shutdown, a failed engine or upstream) ends by
    #: closing the connection without the response's end, because the format has no bytes of
    #: its own to say so: delta text would otherwise end exactly like a finished reply.
    cut_closes_connection = True

    def delta(self, text: str) -> bytes:
        """The bytes for newly generated `text`."""
        return text.encode()

    def done(self, outcome: str, usage: dict[str, int]) -> bytes:
        """The closing bytes of a finished reply."""
        return b""

    def error(self, body: dict[str, Any]) -> bytes:
        """The closing bytes after a failure that came too late for an HTTP status."""
        return b""

    def ping(self) -> bytes:
        """A keep-alive that carries no text (only SSE has one)."""
        return b""

    def queue(self, position: int, eta_s: float | None) -> bytes:
        """Where a waiting request stands (only SSE tells it): `position` 1 is next; `eta_s`
        estimates the wait (None until a generation has finished: nothing measured yet)."""
        return b""


class ChatStreamEncoder(WireEncoder):
    """ChatStream's format: every chunk is the whole reply so far, then `<::EOS::>`."""

    cut_closes_connection = False  # as ChatStream ended every stream: its front-ends expect it

    def __init__(self) -> None:
        self._reply = ""

    def delta(self, text: str) -> bytes:
        self._reply += text
        return (self._reply + CHATSTREAM_EOS).encode()


class SSEEncoder(WireEncoder):
    """Server-sent events: `data: {"delta": ...}` per chunk, then `event: done` or `event: error`."""

    media_type = "text/event-stream; charset=utf-8"
    cut_closes_connection = False  # `event: error` says it

    def delta(self, text: str) -> bytes:
        return sse_event({"delta": text})

    def done(self, outcome: str, usage: dict[str, int]) -> bytes:
        return sse_event({"outcome": outcome, "usage": usage}, "done")

    def error(self, body: dict[str, Any]) -> bytes:
        return sse_event(body, "error")

    def ping(self) -> bytes:
        return sse_ping()

    def queue(self, position: int, eta_s: float | None) -> bytes:
        return sse_event({"position": position, "eta_s": eta_s}, "queue")


def sse_event(data: dict[str, Any] | str, event: str | None = None, *, line_end: str = "\r\n") -> bytes:
    """One server-sent event: `data` (JSON-encoded unless already text, on one line), named `event`."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}{line_end}" if event else ""
    return f"{head}data: {text}{line_end}{line_end}".encode()


def sse_ping(*, line_end: str = "\r\n") -> bytes:
    """An SSE comment that carries nothing, to keep proxies from timing out a silent stream."""
    return f": ping{line_end}{line_end}".encode()


def check_stream_format(stream_format: str) -> None:
    """Refuse a server's `stream_format` that is not one of the formats (a configuration mistake)."""
    if stream_format not in STREAM_FORMATS:
        raise ValueError(f"stream_format must be one of {', '.join(STREAM_FORMATS)}, not {stream_format!r}")


def choose_format(scope: Scope, default: StreamFormat) -> StreamFormat | None:
    """`?format=`, then `Accept: text/event-stream`, then `default`; None for an unknown `?format=`."""
    requested = QueryParams(scope.get("query_string", b"")).get("format")
    if requested is not None:
        return requested if requested in STREAM_FORMATS else None
    if "text/event-stream" in Headers(scope=scope).get("accept", ""):
        return "sse"
    return default


def encoder_for(stream_format: StreamFormat) -> WireEncoder:
    """A fresh encoder (the ChatStream one keeps the reply so far)."""
    if stream_format == "chatstream":
        return ChatStreamEncoder()
    if stream_format == "sse":
        return SSEEncoder()
    return WireEncoder()
