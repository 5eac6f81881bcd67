"""What the middleware knows about one chat request, and the one place a client's leaving is seen.

The middleware reads the body, opens the session and watches the client; the handler (maybe
deep inside a user's endpoint) needs all three. They travel in one namespaced scope key, the
way Starlette passes `starlette.max_body_size`, so no global state ties the two together.

Whoever watches the client (the middleware, or the response itself when no middleware is in
front) runs `ChatExchange.watch` on the server's `receive`, and sends through `track`, so that a
disconnect after the final body (which servers report too) is not taken for a client leaving.
Unlike Starlette's `StreamingResponse`, we listen whatever ASGI spec version the server reports:
uvicorn reports 2.3 and its `send()` to a gone client returns silently, so listening is the only
way to know.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from starlette.types import Message, Receive, Send

from chatstream_asgi.sessions.store import TurnSession

EXCHANGE_KEY = "chatstream_asgi.exchange"


class _Abandonable(Protocol):
    async def abandon(self) -> None: ...


class ChatExchange:
    """Per-request state of a chat request, shared by the middleware and the handler."""

    def __init__(
        self, body: bytes, session: TurnSession | None, ping_interval: float, *, watched_by_response: bool = False
    ) -> None:
        self.body = body
        #: True when no middleware watches the client: the response runs `watch` while it streams.
        self.watched_by_response = watched_by_response
        self._session = session
        self.ping_interval = ping_interval
        #: Set when the client disconnects before the response is complete.
        self.client_left = anyio.Event()
        #: Set when there is nothing more to receive: the client left or the response is complete.
        self.ended = anyio.Event()
        self.response_started = False
        self.response_complete = False
        #: The admitted turn, until it finishes; the middleware closes it if nobody streamed it.
        self.open_turn: _Abandonable | None = None

    @property
    def session(self) -> TurnSession:
        """The request's session (every path but the stateless `/v1` has one)."""
        if self._session is None:
            raise RuntimeError("this request is stateless: it has no session")
        return self._session

    async def watch(self, receive: Receive) -> None:
        """Read `receive` until `http.disconnect`; mark the client gone if the response was not complete."""
        while (await receive())["type"] != "http.disconnect":
            pass
        # After the final body, servers report a disconnect too: that one is not a client leaving.
        if not self.response_complete:
            self.client_left.set()
        self.ended.set()

    def track(self, send: Send) -> Send:
        """`send`, noting when the response starts and when its final body went out."""

        async def send_and_track(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.response_started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                self.response_complete = True
            await send(message)
            if self.response_complete:
                self.ended.set()

        return send_and_track

    async def close(self) -> None:
        """Finish a turn that was admitted but never streamed (an endpoint dropped the response)."""
        if self.open_turn is not None:
            await self.open_turn.abandon()
