"""`request.state.session` on an app's own routes, opened only when a route reads it.

ChatStream apps read `request.state.session` on any path (fastsession attached it everywhere).
The middleware attaches a `LazySession` to every HTTP request it passes through: a route that
never reads it pays one small object, no cookie parsing and no store read. The first
`get_session()` opens the session; a `MemoryStore` answers at once, while a store that needs
I/O (`RedisStore`) wants `await request.state.session.load()` first, since a synchronous
read would block the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Scope

from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.sessions.cookie import session_cookie_value
from chatstream_asgi.sessions.session import Session
from chatstream_asgi.sessions.signing import CookieSigner
from chatstream_asgi.sessions.store import SessionStore


class LazySession:
    """The cookie's session, opened on first use (see the module docstring)."""

    __slots__ = ("_cookie", "_prompt_from_dict", "_scope", "_session", "_signer", "_store")

    def __init__(
        self,
        scope: Scope,
        cookie: str,
        signer: CookieSigner,
        store: SessionStore,
        prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt],
    ) -> None:
        self._scope = scope
        self._cookie = cookie
        self._signer = signer
        self._store = store
        self._prompt_from_dict = prompt_from_dict
        self._session: Session | None = None

    @property
    def opened(self) -> Session | None:
        """The session, if a route opened it."""
        return self._session

    async def load(self) -> Session:
        """Open the session from its store (any store)."""
        if self._session is None:
            self._session = await Session.open(self._session_id(), self._store, self._prompt_from_dict)
        return self._session

    def get_session(self) -> dict[str, Any]:
        """The session's dict, as `Session.get_session()`."""
        return self._open_now().get_session()

    def save_session(self) -> None:
        """Mark the session to be stored when the request ends."""
        self._open_now().save_session()

    def clear_session(self) -> None:
        """Empty the session; stored when the request ends."""
        self._open_now().clear_session()

    def get_session_id(self) -> str:
        """The session's id."""
        return self._open_now().session_id

    def start_new(self) -> Session:
        """Put a new, empty session in place of the cookie's (whose stored conversation stays):
        its cookie goes out with the response, as any new session's does."""
        self._session = Session.open_new(self._store, self._prompt_from_dict)
        return self._session

    def named_by_cookie(self) -> bool:
        """Whether the request carries a cookie naming a session of ours."""
        return self._session_id() is not None

    def _open_now(self) -> Session:
        if self._session is None:
            load_now = getattr(self._store, "load_now", None)
            if load_now is None:
                raise RuntimeError(
                    f"{type(self._store).__name__} reads over the network: call "
                    "`await request.state.session.load()` on this route before using the session"
                )
            session_id = self._session_id()
            if session_id is None:
                self._session = Session.open_new(self._store, self._prompt_from_dict)
            else:
                stored = load_now(session_id)
                self._session = Session.from_stored(session_id, stored, self._store, self._prompt_from_dict)
        return self._session

    def _session_id(self) -> str | None:
        signed = session_cookie_value(self._scope, self._cookie)
        return self._signer.unsign(signed) if signed else None
