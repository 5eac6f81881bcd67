"""`ChatStreamMiddleware`: the pure-ASGI front of the chat path: its options, its routing table,
and the lifespan of the requests it serves; each route's work lives in a module of its own.

For `POST /chat_stream` it reads the body once (bounded, `body`), opens the session
(`cookie_sessions`), and hands the request to the app's endpoint or (`serve=True`) the chat
endpoint with the body replayed and the client watched (`exchange.converse`): from then on only
the exchange's watcher calls the real `receive`, to see the client leave.
`chat_stream=` is anything with a chat endpoint (`chat_endpoint.ChatServer`): the `ChatStream`
facade, or a `ChatEndpoint` built over a `ChatService`; this module never imports the facade.

ChatStream's conversation APIs get the session too, whether the middleware serves them
(`apis=`) or the app mounted them (`chat_stream.append_apis`). `/v1/chat/completions` (with
`openai=True`) gets the same body replay and disconnect watch, without a session. `webui=True`
serves the chat page (`/` and its script and style files), the session APIs it calls and its
`POST /new_chat` (a fresh session). With
`api_keys`, every route the middleware serves but `/health` and `/ready`, and the chat path and
ChatStream's APIs when the app serves them (its own endpoint, `append_apis`), need a bearer key
whose scopes include the route's: `chat` (`/chat_stream`, `/v1`, the page), `apis` (the
conversation APIs) or `admin` (`get_prompt`, `get_resource_usage`, `/metrics`).
A POST that changes the cookie's conversation (the chat, `clear_context`,
`set_generation_params`, `set_feedback`) and carries the cookie must be JSON from this server's
own origin or one of `allowed_origins` (`csrf.CookieGuard`: same-site CSRF); `/v1` takes JSON only.
Every route it serves gets an `X-Request-Id` and a `RequestTelemetry` (`telemetry.py`) that its
log lines and metrics (`metrics=True`: `/metrics`) go through.
A route the middleware answers itself, asked with another method, is 405 JSON naming the method
to use (`GET /chat_stream` with `serve=True`). Every other request (other paths, `OPTIONS`, other
methods on routes it only intercepts for the app, websockets, lifespan) passes straight through,
so an app's own CORS preflights and its own routes are never shadowed.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import anyio.to_thread
from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatstream_asgi.asgi.access import ADMIN_APIS, ApiKeys, KeyRing
from chatstream_asgi.asgi.body import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_SIZE,
    read_body,
    replay_body,
    says_json,
)
from chatstream_asgi.asgi.chat_endpoint import ChatServer
from chatstream_asgi.asgi.conversation_apis import (
    API_METHODS,
    PAGE_APIS,
    SESSION_APIS,
    ApiOptions,
    enabled_apis,
    handle_api,
)
from chatstream_asgi.asgi.cookie_sessions import CookieSessions
from chatstream_asgi.asgi.csrf import CookieGuard
from chatstream_asgi.asgi.exchange import ChatExchange, converse
from chatstream_asgi.asgi.http_errors import ErrorShape, send_error
from chatstream_asgi.asgi.openai_api import chat_completions, models_response
from chatstream_asgi.asgi.telemetry import send_with_request_id, start_request, telemetry_of
from chatstream_asgi.asgi.waiting import API_KEY_SCOPE_KEY
from chatstream_asgi.asgi.webui import NEW_CHAT_NEEDS_JSON, NEW_CHAT_PATH, ChatPage
from chatstream_asgi.errors import (
    BodyTimeout,
    BodyTooLarge,
    ChatStreamError,
    MethodNotAllowed,
    SessionStoreUnavailable,
    ShuttingDown,
    UnsupportedMediaType,
)
from chatstream_asgi.log import bind_request_id, request_logger, unbind_request_id
from chatstream_asgi.outcomes import OutcomeCallback
from chatstream_asgi.sessions.memory import MemoryStore
from chatstream_asgi.sessions.session import Session
from chatstream_asgi.sessions.store import SessionStore

if TYPE_CHECKING:
    from chatstream_asgi.asgi.metrics import ChatMetrics

logger = request_logger(__name__)
_Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Route(NamedTuple):
    """A route of the middleware: its method, handler, key scope (None: no key) and error shape;
    `owned` when the middleware answers it itself, so another method is 405 rather than the app's;
    `guarded` when it changes the cookie's conversation, so a request with the cookie must be
    JSON from this server's own origin (`csrf.CookieGuard`)."""

    method: str
    handler: _Handler
    needed: str | None
    shape: ErrorShape
    owned: bool
    guarded: bool = False


#: Why a `/v1/chat/completions` without a JSON `Content-Type` is refused.
_V1_NEEDS_JSON = "POST /v1/chat/completions takes Content-Type: application/json, as OpenAI's API does"

#: Seconds the lifespan shutdown waits for cancelled requests to finish (history, slot, callback).
FINISH_GRACE = 10.0
#: Seconds between looks at admission while a drain waits for chats to end.
_DRAIN_POLL = 0.1


class ChatStreamMiddleware:
    """Adds the chat path (and, on request, its companion routes) to any ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        chat_stream: ChatServer,
        serve: bool = False,
        callback: OutcomeCallback | None = None,
        path: str = "/chat_stream",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        session_store: SessionStore | None = None,
        secret_key: str | bytes | None = None,
        session_cookie: str = "chatstream_session",
        https_only: bool = False,
        allowed_origins: Iterable[str] = (),
        apis: ApiOptions | None = None,
        openai: bool = False,
        api_keys: ApiKeys | None = None,
        health: bool = False,
        webui: bool = False,
        web_ui_params: dict[str, Any] | None = None,
        metrics: bool = False,
        log_content: bool = False,
        ping_interval: float = 15.0,
    ) -> None:
        if max_body_size < 1:
            raise ValueError(f"max_body_size must be at least 1 byte, not {max_body_size}")
        if body_timeout <= 0:
            raise ValueError(f"body_timeout must be positive seconds, not {body_timeout}")
        if ping_interval <= 0:
            raise ValueError(f"ping_interval must be positive seconds, not {ping_interval}")
        self.app = app
        #: What was passed as `chat_stream=` (a `ChatStream`, or a `ChatEndpoint`).
        self.chat_stream = chat_stream
        self.endpoint = chat_stream.endpoint
        self.service = self.endpoint.service
        self.serve = serve
        self.callback = callback
        self.path = path
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        store: SessionStore = session_store if session_store is not None else MemoryStore()
        self.sessions = CookieSessions(
            store,
            secret_key=secret_key,
            cookie=session_cookie,
            https_only=https_only,
            prompt_from_dict=self.service.prompt_from_dict,
        )
        self._guard = CookieGuard(self.sessions.cookie, allowed_origins, https_only=https_only)
        self.health = health
        self.openai = openai
        self.ping_interval = ping_interval
        self.log_content = log_content
        self._metrics: ChatMetrics | None = None
        self._shutting_down = False
        self._in_flight = 0  # served requests not yet ended, for the lifespan shutdown to wait on
        self._idle: anyio.Event | None = None
        self._chats = 0  # chats (/chat_stream, /v1) not yet ended, for a drain to wait on
        self._no_chats: anyio.Event | None = None
        if metrics:  # imported only when asked for: without metrics, prometheus-client is never loaded
            from chatstream_asgi.asgi.metrics import ChatMetrics

            self._metrics = ChatMetrics(self.service.admission.load)
            if hasattr(store, "observer"):  # a store that times its calls (RedisStore)
                store.observer = self._metrics.store_call
        self.api_options: ApiOptions = apis or {}
        self.served_apis = enabled_apis(apis) | (PAGE_APIS if webui else frozenset())
        # `web_ui_params` as ChatStream's append_apis takes them: title, placeholder, greeting.
        self.page = (
            ChatPage(
                web_ui_params,
                model=self.service.name,
                chat_path=path,
                system_prompt=self.endpoint.allow_system_prompt,
            )
            if webui
            else None
        )
        self._api_keys = KeyRing(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                receive = self._hold_lifespan_shutdown(receive)
            await self.app(scope, receive, send)
            return
        match = self._match(get_route_path(scope), scope["method"])
        if match is None:
            await self._passthrough(scope, receive, send)
            return
        handler, needed, shape, guarded = match
        telemetry = start_request(scope, self._metrics, log_content=self.log_content)
        send = send_with_request_id(send, telemetry.request_id)
        bound = bind_request_id(telemetry.request_id)
        self._in_flight += 1
        try:
            if needed is not None and not await self._authorized(scope, send, needed, shape):
                return
            if guarded and (refusal := self._guard.refusal(scope)) is not None:
                await self._refuse(scope, send, refusal, shape)
                return
            await handler(scope, receive, send)
        except anyio.get_cancelled_exc_class():
            # The server cancelled the request: it is stopping (uvicorn's graceful-shutdown timeout).
            # The request was answered and its turn finished on the way out; re-raising would only
            # make the server log a traceback for a routine deploy.
            logger.warning("%s %s cut short: the server is shutting down", scope["method"], scope["path"])
        finally:
            unbind_request_id(bound)
            self._in_flight -= 1
            if not self._in_flight and self._idle is not None:
                self._idle.set()

    @property
    def session_store(self) -> SessionStore:
        """Where the sessions this middleware attaches are kept."""
        return self.sessions.store

    @property
    def session_cookie(self) -> str:
        """The name of the session cookie."""
        return self.sessions.cookie

    @property
    def shutting_down(self) -> bool:
        """True once `begin_shutdown()` was called or the server began its lifespan shutdown."""
        return self._shutting_down

    def begin_shutdown(self) -> None:
        """Refuse new chats from now on (503 `shutting_down`); running and queued ones go on.

        `chatstream-asgi serve` calls this on SIGTERM or Ctrl-C; under another server, call it
        when draining starts. Lifespan shutdown calls it too.
        """
        self._shutting_down = True
        if self._metrics is not None:
            self._metrics.draining.set(1)

    async def drain(self, timeout: float) -> bool:
        """Take no new chats (`begin_shutdown`) and wait up to `timeout` seconds for running and
        queued ones to finish, while every other route still answers: `/ready` says
        `shutting_down` (503) so a balancer takes the replica out, and `/metrics` is scraped to
        the end. True once no chat is left. `chatstream-asgi serve` drains on SIGTERM before it
        stops listening; under another server, call it from your own signal handling."""
        self.begin_shutdown()
        with anyio.move_on_after(timeout):
            while self._chats_left():
                self._no_chats = anyio.Event()
                with anyio.move_on_after(_DRAIN_POLL):  # admission has no event to wait on
                    await self._no_chats.wait()
        return not self._chats_left()

    def _chats_left(self) -> bool:
        """Whether a chat is still in the server: on our routes (counted), or holding or awaiting a
        slot (a chat endpoint on a path of the app's own)."""
        load = self.service.admission.load()
        return bool(self._chats or load.processing or load.waiting)

    def _hold_lifespan_shutdown(self, receive: Receive) -> Receive:
        """`receive` for the lifespan, holding `lifespan.shutdown` back until requests have ended."""

        async def receive_lifespan() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self._drain()
            return message

        return receive_lifespan

    async def _drain(self) -> None:
        """Wait (bounded) for requests still finishing, then stop the engines.

        A server that cancels request tasks at its graceful-shutdown timeout (uvicorn) does not
        wait for them: it goes on to the lifespan shutdown and then exits, which would cut their
        shielded finish (history, slot, callback) short.
        """
        self.begin_shutdown()
        with anyio.move_on_after(FINISH_GRACE):
            while self._in_flight:
                self._idle = anyio.Event()
                await self._idle.wait()
        if self._in_flight:
            logger.warning("stopping with %d requests still finishing after %s s", self._in_flight, FINISH_GRACE)
        await anyio.to_thread.run_sync(self.chat_stream.close)  # it waits for the engine threads

    def _match(self, route: str, method: str) -> tuple[_Handler, str | None, ErrorShape, bool] | None:
        """The handler of a request this middleware answers, the key scope it needs (None: no
        key), the shape of its errors, and whether `CookieGuard` checks it; None for everything
        that passes through.

        A route the middleware answers itself, asked with another method, is 405 (after the key
        check, as any of its requests). `HEAD` is answered as `GET`. `OPTIONS` passes through,
        so an app's CORS middleware inside this one answers preflights; so does any method on a
        route the middleware only intercepts for the app (its own chat endpoint, its own APIs).
        """
        found = self._routes(route)
        asked = "GET" if method == "HEAD" else method
        for candidate in found:
            if candidate.method == asked:
                return candidate.handler, candidate.needed, candidate.shape, candidate.guarded
        owned = [candidate for candidate in found if candidate.owned]
        if owned and method != "OPTIONS":
            allowed = ", ".join(candidate.method for candidate in owned)
            first = owned[0]
            return functools.partial(self._wrong_method, allowed, first.shape), first.needed, first.shape, False
        return None

    def _routes(self, route: str) -> list[_Route]:
        """What this middleware does with `route`, one entry a method: the one routing table.
        (A path may take two: `path="/"` chats by POST where the page is served by GET.)"""
        api = route[1:]
        found: list[_Route] = []
        # The chat path and the APIs the app mounted (`append_apis`) need the same key as when
        # this middleware serves them: keys that guarded only the middleware's own routes would
        # leave the same conversations open one `append_apis` away.
        if route == self.path:
            chat = functools.partial(self._counted_chat, self._chat)
            found.append(_Route("POST", chat, "chat", "plain", owned=self.serve, guarded=True))
        needed = "admin" if api in ADMIN_APIS else "apis"
        # A POST of a session API changes the conversation: guarded like the chat.
        changes = api in SESSION_APIS and API_METHODS.get(api) == "POST"
        if api in self.served_apis:
            handler = functools.partial(self._api, api)
            found.append(_Route(API_METHODS[api], handler, needed, "chatstream", owned=True, guarded=changes))
        elif api in SESSION_APIS or (api in API_METHODS and self._api_keys):
            # The app mounted it: it gets the session from here, and the key check with keys.
            handler = functools.partial(self._api, api)
            found.append(_Route(API_METHODS[api], handler, needed, "chatstream", owned=False, guarded=changes))
        if self.openai and route == "/v1/chat/completions":
            completions = functools.partial(self._counted_chat, self._completions)
            found.append(_Route("POST", completions, "chat", "openai", owned=True))
        if self.openai and route == "/v1/models":
            found.append(_Route("GET", models_response(self.service), "chat", "openai", owned=True))
        if self.health and route in ("/health", "/ready"):
            found.append(_Route("GET", functools.partial(self._health, route), None, "plain", owned=True))
        if self._metrics is not None and route == "/metrics":
            found.append(_Route("GET", self._metrics_response, "admin", "plain", owned=True))
        if self.page is not None and route == NEW_CHAT_PATH:
            # With a cookie, it carries the visitor's session: from another origin, it must not swap it.
            found.append(_Route("POST", self._new_chat, "chat", "chatstream", owned=True, guarded=True))
        if self.page is not None and (page := self.page.response(route)) is not None:
            found.append(_Route("GET", page, "chat", "plain", owned=False))  # another method on / may be the app's
        return found

    async def _wrong_method(self, allowed: str, shape: ErrorShape, scope: Scope, receive: Receive, send: Send) -> None:
        await self._refuse(scope, send, MethodNotAllowed(scope["method"], scope["path"], allowed), shape)

    async def _new_chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The page's "New chat": a fresh session and its cookie. The old conversation stays in
        the store (until its TTL) rather than being cleared: starting over destroys nothing.
        It takes a JSON `Content-Type` only: it needs no cookie, so SameSite cannot keep another
        site's form from swapping a visitor's conversation for a new one."""
        if not says_json(scope):
            await self._refuse(scope, send, UnsupportedMediaType(NEW_CHAT_NEEDS_JSON), "chatstream")
            return

        async def answer(session: Session, send: Send) -> None:
            await JSONResponse({"success": True})(scope, receive, send)

        await self.sessions.around(scope, send, answer, "chatstream", fresh=True)

    async def _passthrough(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app's own routes: `request.state.session` is there for them, opened only if read."""
        lazy, send_with_session = self.sessions.lazily(scope, send)
        try:
            await self.app(scope, receive, send_with_session)
        finally:
            await self.sessions.persist_lazy(lazy)

    async def _authorized(self, scope: Scope, send: Send, needed: str, shape: ErrorShape) -> bool:
        """With `api_keys` set, check `Authorization: Bearer <key>` before anything else: 401
        without a valid key, 403 with a key that lacks the `needed` scope."""
        if not self._api_keys:
            return True
        authorization = Headers(scope=scope).get("authorization", "")
        refusal = self._api_keys.refusal(authorization, needed)
        if refusal is None:
            scope[API_KEY_SCOPE_KEY] = authorization.partition(" ")[2].strip()  # whose turn it is under fair admission
            return True
        await self._refuse(scope, send, refusal, shape)
        return False

    async def _refuse(self, scope: Scope, send: Send, error: ChatStreamError, shape: ErrorShape) -> None:
        telemetry_of(scope).refused(error)
        await send_error(send, error, shape)

    async def _chat_body(self, scope: Scope, receive: Receive, send: Send, shape: ErrorShape) -> bytes | None:
        """The body of a chat request (`/chat_stream`, `/v1`), or None once it was refused: the
        server is stopping (503), or the body is too large or too slow (413, 408)."""
        if self._shutting_down:
            await self._refuse(scope, send, ShuttingDown("the server is shutting down"), shape)
            return None
        return await self._read_body_or_refuse(scope, receive, send, shape)

    async def _counted_chat(self, handler: _Handler, scope: Scope, receive: Receive, send: Send) -> None:
        """Run a chat route's handler, counted for `drain`."""
        self._chats += 1
        try:
            await handler(scope, receive, send)
        finally:
            self._chats -= 1
            if not self._chats and self._no_chats is not None:
                self._no_chats.set()

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._chat_body(scope, receive, send, "plain")
        if body is None:
            return

        async def in_session(session: Session, send: Send) -> None:
            async def answer(exchange: ChatExchange, receive: Receive, send: Send) -> None:
                if self.serve:
                    request = Request(scope, receive)
                    response = await self.chat_stream.handle_chat_stream_request(request, callback=self.callback)
                    await response(scope, receive, send)
                else:
                    await self.app(scope, receive, send)

            await converse(scope, receive, send, body, session, answer, "plain", ping_interval=self.ping_interval)

        await self.sessions.around(scope, send, in_session, "plain")

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        # OpenAI's API is JSON, and a page elsewhere cannot send JSON unasked: so no other site can
        # make its visitors' browsers run generations here (with no cookie, CookieGuard has nothing to check).
        if not says_json(scope):
            await self._refuse(scope, send, UnsupportedMediaType(_V1_NEEDS_JSON), "openai")
            return
        body = await self._chat_body(scope, receive, send, "openai")
        if body is None:
            return

        async def answer(exchange: ChatExchange, receive: Receive, send: Send) -> None:
            request = Request(scope, receive)
            response = await chat_completions(self.endpoint, request, exchange, self.callback)
            await response(scope, receive, send)

        await converse(scope, receive, send, body, None, answer, "openai", ping_interval=self.ping_interval)

    async def _api(self, name: str, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body_or_refuse(scope, receive, send, "chatstream")
        if body is None:
            return
        replay_receive = replay_body(body, receive)

        async def answer(session: Session | None, send: Send) -> None:
            if name in self.served_apis:
                request = Request(scope, replay_receive)
                response = await handle_api(self.endpoint, name, request, self.api_options)
                await response(scope, replay_receive, send)
            else:  # the app mounted it (append_apis): it only needs the session
                await self.app(scope, replay_receive, send)

        if name in SESSION_APIS:
            await self.sessions.around(scope, send, answer, "chatstream")
        else:
            await answer(None, send)

    async def _read_body_or_refuse(self, scope: Scope, receive: Receive, send: Send, shape: ErrorShape) -> bytes | None:
        """The body, or None when the client left or it was refused (413 too large, 408 too slow)."""
        try:
            return await read_body(scope, receive, max_size=self.max_body_size, timeout=self.body_timeout)
        except (BodyTooLarge, BodyTimeout) as error:
            await self._refuse(scope, send, error, shape)
            return None

    async def _health(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        if route == "/health":
            response = JSONResponse({"status": "ok"})
        else:
            status = await self.readiness()
            response = JSONResponse(
                {"status": status, "load": self.service.load()}, status_code=200 if status == "ready" else 503
            )
        await response(scope, receive, send)

    async def readiness(self) -> str:
        """What `/ready` says: `"ready"`, or why not: `"shutting_down"` (draining: take this
        replica out of the balancer), `"loading"`, `"upstream_unavailable"` (front mode), or
        `"session_store_unavailable"` (every chat would get 503 until the store is back)."""
        if self._shutting_down:
            return "shutting_down"
        status = await self.service.readiness()
        if status != "ready":
            return status
        ping = getattr(self.sessions.store, "ping", None)
        if ping is not None:
            try:
                await ping()
            except SessionStoreUnavailable as error:
                logger.warning("not ready: %s", error.detail)
                return "session_store_unavailable"
        return "ready"

    async def _metrics_response(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._metrics is not None  # routed here only with metrics on
        from chatstream_asgi.asgi.metrics import CONTENT_TYPE

        await Response(self._metrics.exposition(), media_type=CONTENT_TYPE)(scope, receive, send)
