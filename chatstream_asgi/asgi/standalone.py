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

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from chatstream_asgi.asgi.exchange import EXCHANGE_KEY, ChatExchange
from chatstream_asgi.asgi.http_errors import client_closed_response, error_response
from chatstream_asgi.asgi.streaming import AdmittedResponse
from chatstream_asgi.asgi.waiting import WaitingResponse
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.errors import SessionStoreUnavailable
from chatstream_asgi.outcomes import OutcomeCallback
from chatstream_asgi.sessions.attached import FallbackSessions, attached_session
from chatstream_asgi.sessions.cookie import session_cookie_value
from chatstream_asgi.sessions.lazy import LazySession
from chatstream_asgi.sessions.session import Session

#: The cookie of the sessions the handler keeps itself (the middleware's default name).
FALLBACK_COOKIE = "chatstream_session"
#: Seconds between SSE pings without the middleware (its `ping_interval` default).
_PING_INTERVAL = 15.0

#: The chat handler to run once the exchange is in the scope (`ChatEndpoint.handle`).
ChatHandler = Callable[[Request, "bytes | str | None", "OutcomeCallback | None"], Awaitable[Response]]


async def handle_without_middleware(
    request: Request,
    request_body: bytes | str | None,
    callback: OutcomeCallback | None,
    *,
    sessions: FallbackSessions,
    prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt],
    handle: ChatHandler,
) -> Response:
    """Run `handle` (the chat handler) where no middleware put an exchange in the scope."""
    if request_body is None:
        try:
            request_body = await request.body()
        except ClientDisconnect:  # left before its request was read: it never reached admission
            return client_closed_response()
    lazy = request.scope.get("state", {}).get("session")
    if isinstance(lazy, LazySession):  # behind our middleware, on a path of the app's own: our session
        try:
            await lazy.load()
        except SessionStoreUnavailable as error:
            return error_response(error)
    session = attached_session(request, sessions)
    cookie: str | None = None
    if session is None:
        signed = session_cookie_value(request.scope, FALLBACK_COOKIE)
        session_id = sessions.signer.unsign(signed) if signed else None
        own = await Session.open(session_id, sessions.store, prompt_from_dict)
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
            response = await handle(request, request_body, callback)
        finally:
            task_group.cancel_scope.cancel()
    if cookie is not None and isinstance(response, (AdmittedResponse, WaitingResponse)):
        response.raw_headers.append((b"set-cookie", cookie.encode()))
    return response
