"""What the middleware knows about one chat request, handed to the chat handler through the scope.

The middleware reads the body, opens the session and watches the client; the handler (maybe
deep inside a user's endpoint) needs all three. They travel in one namespaced scope key, the
way Starlette passes `starlette.max_body_size`, so no global state ties the two together.
"""

from __future__ import annotations

from typing import Protocol

import anyio
from starlette.types import Scope

from chatstream_asgi.session import Session

EXCHANGE_KEY = "chatstream_asgi.exchange"


class _Abandonable(Protocol):
    async def abandon(self) -> None: ...


class ChatExchange:
    """Per-request state of a `POST /chat_stream`, shared by the middleware and the handler."""

    def __init__(self, body: bytes, session: Session | None, ping_interval: float) -> None:
        self.body = body
        self._session = session
        self.ping_interval = ping_interval
        #: Set when the client disconnects before the response is complete.
        self.client_left = anyio.Event()
        #: Set when there is nothing more to receive: the client left or the response is complete.
        self.ended = anyio.Event()
        self.response_complete = False
        #: The admitted turn, until it finishes; the middleware closes it if nobody streamed it.
        self.open_turn: _Abandonable | None = None

    @property
    def session(self) -> Session:
        """The request's session (every path but the stateless `/v1` has one)."""
        if self._session is None:
            raise RuntimeError("this request is stateless: it has no session")
        return self._session

    async def close(self) -> None:
        """Finish a turn that was admitted but never streamed (an endpoint dropped the response)."""
        if self.open_turn is not None:
            await self.open_turn.abandon()


def exchange_of(scope: Scope) -> ChatExchange:
    """The exchange the middleware put in `scope`; a clear error if the middleware is missing."""
    exchange = scope.get(EXCHANGE_KEY)
    if not isinstance(exchange, ChatExchange):
        raise RuntimeError(
            "handle_chat_stream_request() needs ChatStreamMiddleware in front of this app, "
            "e.g. app.add_middleware(ChatStreamMiddleware, chat_stream=chat_stream); "
            "it reads the body, keeps the session and watches for the client leaving"
        )
    return exchange
