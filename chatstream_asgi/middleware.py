"""`ChatStreamMiddleware`: the pure-ASGI front of the chat path.

For `POST /chat_stream` it reads the body once (bounded), keeps it in the scope and hands
downstream a `receive` that replays it; it opens the session; and it alone calls the real
`receive` from then on, to see the client leave. Unlike Starlette's `StreamingResponse`, we
listen for `http.disconnect` whatever ASGI spec version the server reports: uvicorn reports
2.3 and its `send()` to a gone client returns silently, so listening is the only way to know.

ChatStream's conversation APIs get the session too, whether the middleware serves them
(`apis=`) or the app mounted them (`chat_stream.append_apis`). `/v1/chat/completions` (with
`openai=True`) gets the same body replay and disconnect watch, without a session. `webui=True`
serves the chat page (`/` and its two files) and the session APIs it calls. With
`api_keys`, every route the middleware itself serves but `/health` and `/ready` needs a bearer key.
Every other request (other paths and methods, websockets, lifespan) passes straight through, so an
app's own `OPTIONS` (CORS) or `GET` handling of these paths is never shadowed.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.requests import Request, cookie_parser
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream_asgi.body import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_SIZE, read_body
from chatstream_asgi.chat_stream import ChatStream
from chatstream_asgi.errors import (
    BodyTimeout,
    BodyTooLarge,
    ChatStreamError,
    SessionStoreUnavailable,
    Unauthorized,
    send_error,
)
from chatstream_asgi.exchange import EXCHANGE_KEY, ChatExchange
from chatstream_asgi.openai_api import chat_completions, models_response, openai_error
from chatstream_asgi.routes import API_METHODS, PAGE_APIS, SESSION_APIS, ApiOptions, enabled_apis, handle_api
from chatstream_asgi.session import SECRET_KEY_ENV, CookieSigner, MemoryStore, Session, SessionStore
from chatstream_asgi.turn import OutcomeCallback
from chatstream_asgi.webui import ChatPage

logger = logging.getLogger(__name__)


def check_shared_key(store: SessionStore, secret_key: str | bytes | None) -> None:
    """Refuse a store shared by replicas without a cookie key they share."""
    if store.shared and secret_key is None and not os.environ.get(SECRET_KEY_ENV):
        raise ValueError(
            f"{type(store).__name__} is shared by replicas, so they must sign cookies with one key: "
            f"pass secret_key= or set {SECRET_KEY_ENV} (a random key per process would make each "
            "replica drop the others' sessions)"
        )


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
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        session_store: SessionStore | None = None,
        secret_key: str | bytes | None = None,
        session_cookie: str = "chatstream_session",
        https_only: bool = False,
        apis: ApiOptions | None = None,
        openai: bool = False,
        api_keys: Sequence[str] | None = None,
        health: bool = False,
        webui: bool = False,
        web_ui_params: dict[str, Any] | None = None,
        ping_interval: float = 15.0,
    ) -> None:
        if max_body_size < 1:
            raise ValueError(f"max_body_size must be at least 1 byte, not {max_body_size}")
        if body_timeout <= 0:
            raise ValueError(f"body_timeout must be positive seconds, not {body_timeout}")
        if ping_interval <= 0:
            raise ValueError(f"ping_interval must be positive seconds, not {ping_interval}")
        if isinstance(api_keys, str) or (api_keys is not None and not all(api_keys)):
            raise ValueError("api_keys must be a list of non-empty keys")
        store: SessionStore = session_store if session_store is not None else MemoryStore()
        check_shared_key(store, secret_key)
        self.app = app
        self.chat_stream = chat_stream
        self.serve = serve
        self.callback = callback
        self.path = path
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.session_store = store
        self.session_cookie = session_cookie
        self.health = health
        self.openai = openai
        self.ping_interval = ping_interval
        self.api_options: ApiOptions = apis or {}
        self.served_apis = enabled_apis(apis) | (PAGE_APIS if webui else frozenset())
        # `web_ui_params` as ChatStream's append_apis takes them: title, placeholder, greeting.
        self.page = ChatPage(web_ui_params, model=chat_stream.name, chat_path=path) if webui else None
        self._api_keys = [key.encode() for key in api_keys or ()]
        self._signer = CookieSigner(secret_key)
        self._cookie_attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if https_only else "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = get_route_path(scope)
        method = scope["method"]
        api = route[1:]
        if route == self.path and method == "POST":
            if self.serve and not await self._authorized(scope, send, "plain"):
                return
            await self._chat(scope, receive, send)
        elif API_METHODS.get(api) == method and (api in self.served_apis or api in SESSION_APIS):
            if api in self.served_apis and not await self._authorized(scope, send, "chatstream"):
                return
            await self._api(api, scope, receive, send)
        elif self.openai and (route, method) in (("/v1/chat/completions", "POST"), ("/v1/models", "GET")):
            if not await self._authorized(scope, send, "openai"):
                return
            if route == "/v1/models":
                await models_response(self.chat_stream)(scope, receive, send)
            else:
                await self._completions(scope, receive, send)
        elif self.health and route in ("/health", "/ready") and method == "GET":
            await self._health(route, scope, receive, send)
        elif self.page is not None and method in ("GET", "HEAD") and (page := self.page.response(route)) is not None:
            if await self._authorized(scope, send, "plain"):
                await page(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _authorized(self, scope: Scope, send: Send, shape: str) -> bool:
        """With `api_keys` set, check `Authorization: Bearer <key>` before anything else; 401 if not."""
        if not self._api_keys:
            return True
        scheme, _, key = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(key.strip().encode(), k) for k in self._api_keys):
            return True
        await self._refuse(send, Unauthorized("a valid API key is required: Authorization: Bearer <key>"), shape)
        return False

    async def _refuse(self, send: Send, error: ChatStreamError, shape: str) -> None:
        if shape == "openai":
            response = openai_error(error)
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body, "more_body": False})
        else:
            await send_error(send, error, chatstream_shape=shape == "chatstream")

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body_or_refuse(scope, receive, send, "plain")
        if body is None:
            return

        async def converse(session: Session, send: Send) -> None:
            async def answer(exchange: ChatExchange, receive: Receive, send: Send) -> None:
                if self.serve:
                    request = Request(scope, receive)
                    response = await self.chat_stream.handle_chat_stream_request(request, callback=self.callback)
                    await response(scope, receive, send)
                else:
                    await self.app(scope, receive, send)

            await self._converse(scope, receive, send, body, session, answer)

        await self._with_session(scope, send, converse, chatstream_shape=False)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body_or_refuse(scope, receive, send, "openai")
        if body is None:
            return

        async def answer(exchange: ChatExchange, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            response = await chat_completions(self.chat_stream, request, exchange, self.callback)
            await response(scope, receive, send)

        await self._converse(scope, receive, send, body, None, answer)

    async def _converse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        session: Session | None,
        answer: Callable[[ChatExchange, Receive, Send], Awaitable[None]],
    ) -> None:
        """Run `answer` with the body replayed, the client watched and the exchange in the scope."""
        exchange = ChatExchange(body, session, self.ping_interval)
        scope[EXCHANGE_KEY] = exchange
        body_replayed = False

        async def replay_receive() -> Message:
            nonlocal body_replayed
            if not body_replayed:
                body_replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await exchange.ended.wait()
            return {"type": "http.disconnect"}

        async def send_and_watch(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                exchange.response_complete = True
            await send(message)
            if exchange.response_complete:
                exchange.ended.set()

        async with anyio.create_task_group() as task_group:
            task_group.start_soon(exchange.watch, receive)
            if session is not None and self.session_store.lock_ttl is not None:
                task_group.start_soon(session.keep_turn_locked, self.session_store.lock_ttl / 3)
            try:
                await answer(exchange, replay_receive, send_and_watch)
            finally:
                with anyio.CancelScope(shield=True):
                    await exchange.close()
                task_group.cancel_scope.cancel()

    async def _api(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body_or_refuse(scope, receive, send, "chatstream")
        if body is None:
            return
        body_replayed = False

        async def replay_receive() -> Message:
            nonlocal body_replayed
            if not body_replayed:
                body_replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def answer(session: Session | None, send: Send) -> None:
            if name in self.served_apis:
                request = Request(scope, replay_receive)
                response = await handle_api(self.chat_stream, name, request, self.api_options)
                await response(scope, replay_receive, send)
            else:  # the app mounted it (append_apis): it only needs the session
                await self.app(scope, replay_receive, send)

        if name in SESSION_APIS:
            await self._with_session(scope, send, answer, chatstream_shape=True)
        else:
            await answer(None, send)

    async def _with_session(
        self,
        scope: Scope,
        send: Send,
        run: Callable[[Session, Send], Awaitable[None]],
        *,
        chatstream_shape: bool,
    ) -> None:
        """Open the cookie's session around `run`: a new session's cookie goes out with the
        response, marked changes are stored at the end, and a held turn lock is released."""
        try:
            session = await self._open_session(scope)
        except SessionStoreUnavailable as error:
            await send_error(send, error, chatstream_shape=chatstream_shape)
            return
        scope["state"] = {**scope.get("state", {}), "session": session}

        async def send_with_cookie(message: Message) -> None:
            # Not for a route nobody serves: a 404 or 405 starts no conversation.
            if message["type"] == "http.response.start" and session.is_new and message["status"] not in (404, 405):
                cookie = f"{self.session_cookie}={self._signer.sign(session.session_id)}{self._cookie_attributes}"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        try:
            await run(session, send_with_cookie)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await session.persist()
                except SessionStoreUnavailable as error:  # the response is out; say so in the log
                    logger.warning("session %s not saved: %s", session.session_id, error.detail)
                await session.unlock_turn()

    async def _read_body_or_refuse(self, scope: Scope, receive: Receive, send: Send, shape: str) -> bytes | None:
        """The body, or None when the client left or it was refused (413 too large, 408 too slow)."""
        try:
            return await read_body(scope, receive, max_size=self.max_body_size, timeout=self.body_timeout)
        except (BodyTooLarge, BodyTimeout) as error:
            await self._refuse(send, error, shape)
            return None

    async def _open_session(self, scope: Scope) -> Session:
        cookies = cookie_parser(Headers(scope=scope).get("cookie", ""))
        signed = cookies.get(self.session_cookie)
        session_id = self._signer.unsign(signed) if signed else None
        return await Session.open(session_id, self.session_store, self.chat_stream.prompt_from_dict)

    async def _health(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        if route == "/health":
            response = JSONResponse({"status": "ok"})
        elif await self.chat_stream.check_ready():
            response = JSONResponse({"status": "ready", "load": self.chat_stream.load()})
        else:
            response = JSONResponse({"status": "loading", "load": self.chat_stream.load()}, status_code=503)
        await response(scope, receive, send)
