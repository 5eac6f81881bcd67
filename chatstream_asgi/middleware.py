"""`ChatStreamMiddleware`: the pure-ASGI front of the chat path.

For `POST /chat_stream` it reads the body once (bounded), keeps it in the scope and hands
downstream a `receive` that replays it; it opens the session; and it alone calls the real
`receive` from then on, to see the client leave. Unlike Starlette's `StreamingResponse`, we
listen for `http.disconnect` whatever ASGI spec version the server reports: uvicorn reports
2.3 and its `send()` to a gone client returns silently, so listening is the only way to know.

Every other request (other paths and methods, websockets, lifespan) passes straight through,
so an app's own `OPTIONS` (CORS) or `GET` handling of the chat path is never shadowed.
"""

from __future__ import annotations

import anyio
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream_asgi.chat_stream import ChatStream
from chatstream_asgi.errors import BodyTooLarge, send_error
from chatstream_asgi.exchange import EXCHANGE_KEY, ChatExchange
from chatstream_asgi.session import CookieSigner, MemoryStore, Session, SessionStore
from chatstream_asgi.turn import OutcomeCallback


class ChatStreamMiddleware:
    """Adds the chat path (and, on request, its companion routes) to any ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        chat_stream: ChatStream,
        serve: bool = False,
        callback: OutcomeCallback | None = None,
        path: str = "/chat_stream",
        max_body_size: int = 1 << 20,
        session_store: SessionStore | None = None,
        secret_key: str | bytes | None = None,
        session_cookie: str = "chatstream_session",
        https_only: bool = False,
        health: bool = False,
        ping_interval: float = 15.0,
    ) -> None:
        if max_body_size < 1:
            raise ValueError(f"max_body_size must be at least 1 byte, not {max_body_size}")
        if ping_interval <= 0:
            raise ValueError(f"ping_interval must be positive seconds, not {ping_interval}")
        self.app = app
        self.chat_stream = chat_stream
        self.serve = serve
        self.callback = callback
        self.path = path
        self.max_body_size = max_body_size
        self.session_store: SessionStore = session_store if session_store is not None else MemoryStore()
        self.session_cookie = session_cookie
        self.health = health
        self.ping_interval = ping_interval
        self._signer = CookieSigner(secret_key)
        self._cookie_attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if https_only else "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = get_route_path(scope)
        if route == self.path and scope["method"] == "POST":
            await self._chat(scope, receive, send)
        elif self.health and route in ("/health", "/ready") and scope["method"] in ("GET", "HEAD"):
            await self._health(route, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await self._read_body(scope, receive)
        except BodyTooLarge as error:
            await send_error(send, error)
            return
        if body is None:
            return  # the client left while sending: nothing was admitted, nothing to report
        session = await self._open_session(scope)
        exchange = ChatExchange(body, session, self.ping_interval)
        scope[EXCHANGE_KEY] = exchange
        scope["state"] = {**scope.get("state", {}), "session": session}
        body_replayed = False

        async def replay_receive() -> Message:
            nonlocal body_replayed
            if not body_replayed:
                body_replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await exchange.ended.wait()
            return {"type": "http.disconnect"}

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start" and session.is_new:
                cookie = f"{self.session_cookie}={self._signer.sign(session.session_id)}{self._cookie_attributes}"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.response_complete = True
            await send(message)
            if exchange.response_complete:
                exchange.ended.set()

        async def watch_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            # After the final body, servers report a disconnect too: that one is not a client leaving.
            if not exchange.response_complete:
                exchange.client_left.set()
            exchange.ended.set()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(watch_for_disconnect)
            try:
                if self.serve:
                    request = Request(scope, replay_receive)
                    response = await self.chat_stream.handle_chat_stream_request(request, callback=self.callback)
                    await response(scope, replay_receive, send_with_cookie)
                else:
                    await self.app(scope, replay_receive, send_with_cookie)
            finally:
                with anyio.CancelScope(shield=True):
                    await exchange.close()
                    await session.persist()
                task_group.cancel_scope.cancel()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left; `BodyTooLarge` past `max_body_size`."""
        limit = self.max_body_size
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _open_session(self, scope: Scope) -> Session:
        cookies = cookie_parser(Headers(scope=scope).get("cookie", ""))
        signed = cookies.get(self.session_cookie)
        session_id = self._signer.unsign(signed) if signed else None
        return await Session.open(session_id, self.session_store, self.chat_stream.prompt_from_dict)

    async def _health(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        if route == "/health":
            response = JSONResponse({"status": "ok"})
        elif self.chat_stream.ready:
            response = JSONResponse({"status": "ready", "load": self.chat_stream.load()})
        else:
            response = JSONResponse({"status": "loading", "load": self.chat_stream.load()}, status_code=503)
        await response(scope, receive, send)
