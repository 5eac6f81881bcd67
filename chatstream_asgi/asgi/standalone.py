"""A chat turn with no `ChatStreamMiddleware` in front: any path, any ASGI app, as ChatStream ran.

ChatStream apps call `handle_chat_stream_request` from their own endpoint, usually behind
fastsession's `FastSessionMiddleware` and nothing of ours. The handler then does the
middleware's three jobs itself:

- the body: `request_body` if the endpoint passes it, else `await request.body()`;
- the session: the one another middleware attached as `request.state.session` (fastsession's
  `FastSession`: its `get_session()` dict holds the live `chat_prompt`, as in ChatStream), else
  one of our own in memory, named by a signed `chatstream_session` cookie;
- the client: `receive()` is watched for `http.disconnect` while the request waits for a slot,
  and again by the response while it streams, so the outcomes are the same as behind the middleware.

What only the middleware gives: a bounded body read before any app code runs, a session store
shared by replicas (`RedisStore`) and so 409 `session_busy` across them, sessions on every path
(behind the middleware, a chat endpoint on a path of the app's own uses the middleware's session),
and freeing the slot of a response an endpoint admitted but never returned.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import anyio
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request, cookie_parser
from starlette.responses import Response

from chatstream_asgi.asgi.exchange import EXCHANGE_KEY, ChatExchange
from chatstream_asgi.asgi.streaming import AdmittedResponse, OutcomeCallback
from chatstream_asgi.asgi.waiting import WaitingResponse
from chatstream_asgi.errors import SessionStoreUnavailable, error_response
from chatstream_asgi.sessions.lazy import LazySession
from chatstream_asgi.sessions.session import CookieSigner, MemoryStore, Session, TurnSession

if TYPE_CHECKING:
    from chatstream_asgi.compat.chat_stream import ChatStream

logger = logging.getLogger(__name__)

#: The cookie of the sessions the handler keeps itself (the middleware's default name).
FALLBACK_COOKIE = "chatstream_session"
#: Seconds between SSE pings without the middleware (its `ping_interval` default).
_PING_INTERVAL = 15.0
# nginx's code for "client closed request": the answer nobody receives.
_CLIENT_CLOSED_REQUEST = 499


class FallbackSessions:
    """Where a `ChatStream` keeps sessions when nothing in front of it attaches one.

    Also holds the turn locks of attached sessions, which have no lock of their own: a second
    turn of one conversation gets 409 in this process, as behind the middleware.
    """

    def __init__(self) -> None:
        self.store = MemoryStore()
        self.signer = CookieSigner(None)
        self.attached_turns: set[str] = set()


class AttachedSession:
    """A session another middleware attached (fastsession's `FastSession`, or anything with
    ChatStream's `get_session()`), seen through `TurnSession`.

    Its dict is live, so there is nothing to re-read; `persist` calls its `save_session()`, on
    the event loop as ChatStream did.
    """

    is_new = False

    def __init__(self, attached: Any, turns: set[str]) -> None:
        self._attached = attached
        get_id = getattr(attached, "get_session_id", None)
        self.session_id = str(get_id()) if callable(get_id) else f"attached-{id(attached.get_session())}"
        self._turns = turns
        self._locked = False

    def get_session(self) -> dict[str, Any]:
        data: dict[str, Any] = self._attached.get_session()
        return data

    def save_session(self) -> None:
        """Nothing to mark: `persist` saves."""

    async def persist(self) -> None:
        save = getattr(self._attached, "save_session", None)
        if callable(save):
            save()

    async def reload(self) -> None:
        """The attached dict is live: nothing to re-read."""

    async def lock_turn(self) -> bool:
        if self.session_id in self._turns:
            return False
        self._turns.add(self.session_id)
        self._locked = True
        return True

    async def unlock_turn(self) -> None:
        if self._locked:
            self._turns.discard(self.session_id)
            self._locked = False


def attached_session(request: Request, sessions: FallbackSessions) -> TurnSession | None:
    """The session in `request.state.session`, if something attached one."""
    attached = request.scope.get("state", {}).get("session")
    if isinstance(attached, LazySession):
        if attached.opened is None and not attached.named_by_cookie():
            return None  # a client without our cookie has no session yet (a program, to client_roles)
        attached = attached.opened or attached
    if isinstance(attached, Session):
        return attached
    if attached is not None and callable(getattr(attached, "get_session", None)):
        return AttachedSession(attached, sessions.attached_turns)
    return None


async def handle_without_middleware(
    chat_stream: ChatStream, request: Request, request_body: bytes | str | None, callback: OutcomeCallback | None
) -> Response:
    """`handle_chat_stream_request` where no middleware put an exchange in the scope."""
    if request_body is None:
        try:
            request_body = await request.body()
        except ClientDisconnect:  # left before its request was read: it never reached admission
            return Response(status_code=_CLIENT_CLOSED_REQUEST)
    sessions = chat_stream.fallback_sessions
    lazy = request.scope.get("state", {}).get("session")
    if isinstance(lazy, LazySession):  # behind our middleware, on a path of the app's own: our session
        try:
            await lazy.load()
        except SessionStoreUnavailable as error:
            return error_response(error)
    session = attached_session(request, sessions)
    cookie: str | None = None
    if session is None:
        signed = cookie_parser(Headers(scope=request.scope).get("cookie", "")).get(FALLBACK_COOKIE)
        session_id = sessions.signer.unsign(signed) if signed else None
        own = await Session.open(session_id, sessions.store, chat_stream.prompt_from_dict)
        if own.is_new:
            cookie = f"{FALLBACK_COOKIE}={sessions.signer.sign(own.session_id)}; Path=/; HttpOnly; SameSite=Lax"
        request.scope.setdefault("state", {})["session"] = own  # the callback reads it, as with ChatStream
        session = own
    body = request_body.encode() if isinstance(request_body, str) else request_body
    exchange = ChatExchange(body, session, _PING_INTERVAL, watched_by_response=True)
    request.scope[EXCHANGE_KEY] = exchange
    async with anyio.create_task_group() as task_group:
        task_group.start_soon(exchange.watch, request.receive)  # a client leaving the queue is seen at once
        try:
            response = await chat_stream.handle_chat_stream_request(request, request_body, callback)
        finally:
            task_group.cancel_scope.cancel()
    if cookie is not None and isinstance(response, (AdmittedResponse, WaitingResponse)):
        response.raw_headers.append((b"set-cookie", cookie.encode()))
    return response
