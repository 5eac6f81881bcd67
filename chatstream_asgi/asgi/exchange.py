"""What the middleware knows about one chat request, and the one place a client's leaving is seen.

The middleware reads the body, opens the session and watches the client; the handler (maybe
deep inside a user's endpoint) needs all three. They travel in one namespaced scope key, the
way Starlette passes `starlette.max_body_size`, so no global state ties the two together.

Whoever watches the client (the middleware through `converse`, or the response itself when no
middleware is in front) runs `ChatExchange.watch` on the server's `receive`, and sends through
`track`, so that a disconnect after the final body (which servers report too) is not taken for a
client leaving.
Unlike Starlette's `StreamingResponse`, we listen whatever ASGI spec version the server reports:
uvicorn reports 2.3 and its `send()` to a gone client returns silently, so listening is the only
way to know.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
from starlette.types import Message, Receive, Scope, Send

from chatstream_asgi.asgi.body import replay_body
from chatstream_asgi.asgi.http_errors import ErrorShape, send_error
from chatstream_asgi.errors import ShuttingDown
from chatstream_asgi.sessions.session import Session
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
        """Read `receive` until `http.disconnect`; mark the client gone if the response was not complete.

        While it watches, it also keeps the session's turn lock alive (a store whose locks
        expire, so that a replica that dies frees them): whoever watches the client, the
        middleware or the response itself, holds the turn for as long as the client is there.
        """
        async with anyio.create_task_group() as task_group:
            if isinstance(self._session, Session):
                task_group.start_soon(self._session.keep_turn_locked)
            while (await receive())["type"] != "http.disconnect":
                pass
            task_group.cancel_scope.cancel()
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


#: What answers a chat request once its exchange is set up: `(exchange, receive, send)`.
ChatAnswer = Callable[[ChatExchange, Receive, Send], Awaitable[None]]


async def converse(
    scope: Scope,
    receive: Receive,
    send: Send,
    body: bytes,
    session: Session | None,
    answer: ChatAnswer,
    shape: ErrorShape,
    *,
    ping_interval: float,
) -> None:
    """Run `answer` with a new exchange in the scope, the body replayed and the client watched.

    While the turn runs, the watch keeps a session's turn lock alive, and a client that leaves
    marks its turn as ending, so the session's next turn waits for it instead
    of being refused. If the server cancels the request before a response started (it is
    stopping), the client is answered 503 `shutting_down`.
    """
    exchange = scope[EXCHANGE_KEY] = ChatExchange(body, session, ping_interval)

    async def until_the_end() -> Message:
        await exchange.ended.wait()
        return {"type": "http.disconnect"}

    send_and_track = exchange.track(send)

    async def watch_and_mark_ending() -> None:
        await exchange.watch(receive)
        if session is not None and exchange.client_left.is_set():
            await session.mark_turn_ending()  # the next turn of the session may wait for this one

    async with anyio.create_task_group() as task_group:
        task_group.start_soon(watch_and_mark_ending)
        try:
            await answer(exchange, replay_body(exchange.body, until_the_end), send_and_track)
        except anyio.get_cancelled_exc_class():
            if not exchange.response_started and not exchange.client_left.is_set():
                with anyio.CancelScope(shield=True):  # queued or not yet streaming: it had its outcome
                    await send_error(send_and_track, ShuttingDown("the server is shutting down"), shape)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await exchange.close()
            task_group.cancel_scope.cancel()
