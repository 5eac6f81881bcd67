"""The sessions the middleware attaches: named by a signed cookie, kept by a store.

A route the middleware serves opens its session before the handler runs; an app's own route gets
one that opens only when read (`LazySession`), so a request that never touches it costs no store
round trip. Either way the session goes out the same way: as the response starts, a value JSON
cannot hold is refused (500, naming the key: the app's changes are all made by then) and a new
session's cookie is set; once the response is over, marked changes are stored.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import Message, Scope, Send

from chatstream_asgi.asgi.http_errors import ErrorShape, send_error
from chatstream_asgi.asgi.telemetry import telemetry_of
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.errors import SessionStoreUnavailable, SessionValueNotStorable
from chatstream_asgi.log import request_logger
from chatstream_asgi.sessions.cookie import session_cookie_name, session_cookie_value
from chatstream_asgi.sessions.lazy import LazySession
from chatstream_asgi.sessions.session import Session
from chatstream_asgi.sessions.signing import SECRET_KEY_ENV, CookieSigner
from chatstream_asgi.sessions.store import SessionStore

logger = request_logger(__name__)


def check_shared_key(store: SessionStore, secret_key: str | bytes | None) -> None:
    """Refuse a store shared by replicas without a cookie key they share."""
    if store.shared and secret_key is None and not os.environ.get(SECRET_KEY_ENV):
        raise ValueError(
            f"{type(store).__name__} is shared by replicas, so they must sign cookies with one key: "
            f"pass secret_key= or set {SECRET_KEY_ENV} (a random key per process would make each "
            "replica drop the others' sessions)"
        )


class CookieSessions:
    """Opens, stores and sets the cookie of the sessions in one `store` (see the module docstring)."""

    def __init__(
        self,
        store: SessionStore,
        *,
        secret_key: str | bytes | None,
        cookie: str,
        https_only: bool,
        prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt],
    ) -> None:
        check_shared_key(store, secret_key)
        self.store = store
        #: The cookie's name: `cookie`, as `__Host-<cookie>` with `https_only` (see `sessions.cookie`).
        self.cookie = session_cookie_name(cookie, https_only=https_only)
        self._signer = CookieSigner(secret_key)
        self._cookie_attributes = "; Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if https_only else "")
        self._prompt_from_dict = prompt_from_dict

    async def around(
        self,
        scope: Scope,
        send: Send,
        run: Callable[[Session, Send], Awaitable[None]],
        shape: ErrorShape,
        *,
        fresh: bool = False,
    ) -> None:
        """Open the cookie's session (or, `fresh`, a new one whatever the cookie names) around
        `run`: a new session's cookie goes out with the response, marked changes are stored at
        the end, and a held turn lock is released."""
        try:
            session = await self._open(scope, fresh=fresh)
        except SessionStoreUnavailable as error:
            telemetry_of(scope).refused(error)
            await send_error(send, error, shape)
            return
        scope["state"] = {**scope.get("state", {}), "session": session}
        try:
            await run(session, self._send_with_session(lambda: session, send, shape))
        finally:
            with anyio.CancelScope(shield=True):
                await self._persist(session)
                await session.unlock_turn()

    def lazily(self, scope: Scope, send: Send) -> tuple[LazySession, Send]:
        """A session for the app's own route, opened only if read, and the `send` that sets its cookie."""
        lazy = LazySession(scope, self.cookie, self._signer, self.store, self._prompt_from_dict)
        scope["state"] = {**scope.get("state", {}), "session": lazy}
        return lazy, self._send_with_session(lambda: lazy.opened, send, "plain")

    async def persist_lazy(self, lazy: LazySession) -> None:
        """Store what the app's route changed in its session, if it opened it."""
        if lazy.opened is not None:
            with anyio.CancelScope(shield=True):
                await self._persist(lazy.opened)

    async def _open(self, scope: Scope, *, fresh: bool = False) -> Session:
        signed = None if fresh else session_cookie_value(scope, self.cookie)
        session_id = self._signer.unsign(signed) if signed else None
        return await Session.open(session_id, self.store, self._prompt_from_dict)

    def _send_with_session(self, opened: Callable[[], Session | None], send: Send, shape: ErrorShape) -> Send:
        """`send` that checks the session as the response starts and sets a new session's cookie."""
        refused = False

        async def send_with_session(message: Message) -> None:
            nonlocal refused
            if refused:  # the app's own response was replaced by the error
                return
            session = opened()
            if session is not None and message["type"] == "http.response.start":
                try:
                    session.check_storable()
                except SessionValueNotStorable as error:
                    refused = True
                    await send_error(send, error, shape)
                    return
                # Not for a route nobody serves: a 404 or 405 starts no conversation.
                if session.is_new and message["status"] not in (404, 405):
                    cookie = f"{self.cookie}={self._signer.sign(session.session_id)}{self._cookie_attributes}"
                    message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        return send_with_session

    async def _persist(self, session: Session) -> None:
        """Store a session's marked changes once its response is out (a failure can only be logged)."""
        try:
            await session.persist()
        except (SessionStoreUnavailable, SessionValueNotStorable) as error:
            logger.warning("session %s not saved: %s", session.session_id, error.detail)
