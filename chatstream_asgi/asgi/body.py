"""Reading a request body with bounds: the one place a body comes off the wire.

A body is read whole before anything parses it, so this is where a hostile or careless client
is stopped: one that declares or streams more than `max_size` bytes gets `BodyTooLarge` (413)
as soon as it is known, without the rest being read; one whose body trickles in for longer than
`timeout` seconds in all gets `BodyTimeout` (408), so slow senders cannot hold connections and
memory open. The middleware and the endpoint path without it share this function.

Once read, the body is handed downstream by `replay_body`, as Starlette's `_CachedRequest` does:
the cached body once (`more_body: False`), then whatever the caller says comes next.
"""

from __future__ import annotations

import anyio
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope

from chatstream_asgi.errors import BodyTimeout, BodyTooLarge

#: Defaults of the middleware's `max_body_size` and `body_timeout`.
DEFAULT_MAX_BODY_SIZE = 1 << 20
DEFAULT_BODY_TIMEOUT = 30.0


async def read_body(
    scope: Scope,
    receive: Receive,
    *,
    max_size: int = DEFAULT_MAX_BODY_SIZE,
    timeout: float = DEFAULT_BODY_TIMEOUT,
) -> bytes | None:
    """The whole body, or None if the client left while sending it.

    Raises `BodyTooLarge` past `max_size` bytes (by `Content-Length`, or while a chunked body
    streams) and `BodyTimeout` when the body has not fully arrived within `timeout` seconds.
    """
    declared = Headers(scope=scope).get("content-length", "")
    # (a length of more digits than any size is over the limit without converting it)
    if declared.isdigit() and (len(declared) > 18 or int(declared) > max_size):
        raise BodyTooLarge(f"the body is over the limit of {max_size} bytes")
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_size:
                raise BodyTooLarge(f"the body is over the limit of {max_size} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    raise BodyTimeout(f"the body did not arrive within {timeout:g} seconds")


def replay_body(body: bytes, then: Receive) -> Receive:
    """`receive` for downstream: the body already read, once, then `then` for every later call."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:  # the body is out: what follows is the end of the request (a disconnect)
            return await then()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def says_json(scope: Scope) -> bool:
    """Whether the request's `Content-Type` is JSON's: what a form on another site cannot send
    without a CORS preflight (it may send `text/plain` or form encodings only)."""
    content_type = Headers(scope=scope).get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "application/json"
