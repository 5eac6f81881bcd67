"""How a reply is framed on the wire (DESIGN §4): delta text, ChatStream's cumulative chunks, SSE.

SSE frames follow sse-starlette's conventions (`\\r\\n` line ends, a blank line ends an event,
`: ping` comments to keep proxies from timing out); the delta is JSON-encoded, so a reply
with newlines is still a single `data:` line.
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

    def queue(self, position: int, eta_s: float) -> bytes:
        """Where a waiting request stands (only SSE tells it): `position` 1 is next; `eta_s` estimates the wait."""
        return b""


class ChatStreamEncoder(WireEncoder):
    """ChatStream's format: every chunk is the whole reply so far, then `<::EOS::>`."""

    def __init__(self) -> None:
        self._reply = ""

    def delta(self, text: str) -> bytes:
        self._reply += text
        return (self._reply + CHATSTREAM_EOS).encode()


class SSEEncoder(WireEncoder):
    """Server-sent events: `data: {"delta": ...}` per chunk, then `event: done` or `event: error`."""

    media_type = "text/event-stream; charset=utf-8"

    def delta(self, text: str) -> bytes:
        return _event(None, {"delta": text})

    def done(self, outcome: str, usage: dict[str, int]) -> bytes:
        return _event("done", {"outcome": outcome, "usage": usage})

    def error(self, body: dict[str, Any]) -> bytes:
        return _event("error", body)

    def ping(self) -> bytes:
        return b": ping\r\n\r\n"

    def queue(self, position: int, eta_s: float) -> bytes:
        return _event("queue", {"position": position, "eta_s": eta_s})


def _event(name: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {name}\r\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\r\n\r\n".encode()


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
