"""Sessions the chat handler finds without our middleware having opened one for it.

ChatStream apps call the chat handler from their own endpoint, usually behind fastsession's
`FastSessionMiddleware`: its `FastSession` (or anything with ChatStream's `get_session()`) is
used as it is, seen through `TurnSession`. Behind our middleware, a route of the app's own finds
our lazily opened session. When nothing attached one, the handler keeps sessions of its own in
memory (`FallbackSessions`).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from chatstream_asgi.sessions.lazy import LazySession
from chatstream_asgi.sessions.memory import MemoryStore
from chatstream_asgi.sessions.session import Session
from chatstream_asgi.sessions.signing import CookieSigner
from chatstream_asgi.sessions.store import TurnSession


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
