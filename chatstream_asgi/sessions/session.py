"""`Session`: one client's server-side session, named by a signed cookie, kept by a store.

It is what `request.state.session` is behind the middleware (ChatStream's session API), and it
holds the conversation's turn lock while a turn runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio

from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.errors import SessionStoreUnavailable, SessionValueNotStorable
from chatstream_asgi.log import request_logger
from chatstream_asgi.sessions.signing import CookieSigner
from chatstream_asgi.sessions.store import CHAT_PROMPT_KEY, SessionStore

logger = request_logger(__name__)

#: Seconds a new turn waits for the previous turn of its session to end after its client left.
ENDING_TURN_WAIT = 5.0
#: Seconds a new turn waits before calling a running turn busy: long enough for a Stop that went
#: to another replica (the client closing its stream) to be noted in the shared store.
STOP_SETTLE = 0.25
_LOCK_POLL = 0.02


class Session:
    """`request.state.session`: the API ChatStream's session middleware offered.

    `get_session()` returns the live dict; `save_session()` marks it to be written back. The
    write itself is asynchronous and happens when the chat turn ends, or when the request
    does, so a slow store never stalls the event loop inside a user's synchronous callback.
    """

    def __init__(
        self,
        session_id: str,
        data: dict[str, Any],
        *,
        is_new: bool,
        store: SessionStore,
        prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt],
    ) -> None:
        self.session_id = session_id
        self.is_new = is_new
        self._data = data
        self._store = store
        self._prompt_from_dict = prompt_from_dict
        self._dirty = False
        self._turn_token: str | None = None

    @classmethod
    async def open(
        cls,
        session_id: str | None,
        store: SessionStore,
        prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt],
    ) -> Session:
        """Load `session_id` from `store`; None (no valid cookie) starts a new session.

        A signed id the store does not know (expired, or its first turn still running) keeps
        its id: we issued it, and a second id would split one client's conversation in two.
        """
        if session_id is None:
            return cls.open_new(store, prompt_from_dict)
        return cls.from_stored(session_id, await store.load(session_id), store, prompt_from_dict)

    @classmethod
    def open_new(cls, store: SessionStore, prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt]) -> Session:
        """A new, empty session with a fresh id."""
        return cls(CookieSigner.new_session_id(), {}, is_new=True, store=store, prompt_from_dict=prompt_from_dict)

    @classmethod
    def from_stored(
        cls,
        session_id: str,
        stored: dict[str, Any] | None,
        store: SessionStore,
        prompt_from_dict: Callable[[dict[str, Any]], AbstractChatPrompt],
    ) -> Session:
        """The session `session_id` from what its store returned (None: nothing stored)."""
        data = dict(stored or {})
        if isinstance(data.get(CHAT_PROMPT_KEY), dict):
            data[CHAT_PROMPT_KEY] = prompt_from_dict(data[CHAT_PROMPT_KEY])
        return cls(session_id, data, is_new=False, store=store, prompt_from_dict=prompt_from_dict)

    def get_session(self) -> dict[str, Any]:
        """The session's data; keep JSON-ready values (and the `chat_prompt`) in it."""
        return self._data

    def save_session(self) -> None:
        """Mark the session to be stored when the turn or request ends."""
        self._dirty = True

    def get_session_id(self) -> str:
        """The session's id (as fastsession's `get_session_id()`)."""
        return self.session_id

    def clear_session(self) -> None:
        """Empty the session, conversation included; stored when the request ends."""
        self._data.clear()
        self._dirty = True

    def check_storable(self) -> None:
        """Refuse a marked session holding a value JSON cannot hold, naming its key, before a
        store would fail on it (`SessionValueNotStorable`, 500)."""
        if not self._dirty:
            return
        for key, value in self._data.items():
            if key == CHAT_PROMPT_KEY and isinstance(value, AbstractChatPrompt):
                continue
            try:
                if not isinstance(key, str):
                    raise TypeError(f"keys must be strings, not {type(key).__name__}")
                json.dumps(value)
            except (TypeError, ValueError) as error:
                raise SessionValueNotStorable(
                    f"session value {key!r} cannot be stored ({error}): a session keeps JSON values "
                    "(str, number, bool, None, list, dict) and the chat_prompt"
                ) from None

    async def persist(self) -> None:
        """Write the session to its store if it was marked; the chat path awaits this itself."""
        if not self._dirty:
            return
        self.check_storable()
        data = dict(self._data)
        prompt = data.get(CHAT_PROMPT_KEY)
        if isinstance(prompt, AbstractChatPrompt):
            data[CHAT_PROMPT_KEY] = prompt.to_dict()
        await self._store.save(self.session_id, data)
        self._dirty = False

    # -- the turn lock: one running turn per conversation ---------------------------------

    async def lock_turn(self) -> bool:
        """Take this conversation's turn lock; False if another turn holds it (anywhere).

        A turn that is ending because its client left (the user pressed Stop and sent again at
        once) is waited for, up to `ENDING_TURN_WAIT` seconds; the session is then re-read, since
        that turn has just saved it. A holder whose client is still reading gets a short
        `STOP_SETTLE` grace: a Stop sent to another replica may still be on its way.
        """
        started = anyio.current_time()
        waited = False
        while (token := await self._store.lock_turn(self.session_id)) is None:
            limit = ENDING_TURN_WAIT if await self._store.turn_ending(self.session_id) else STOP_SETTLE
            if anyio.current_time() - started >= limit:
                return False
            waited = True
            await anyio.sleep(_LOCK_POLL)
        self._turn_token = token
        if waited:
            await self.reload()
        return True

    async def mark_turn_ending(self) -> None:
        """Say this session's running turn is ending because its client left, so that the next
        turn waits for it instead of being refused."""
        if self._turn_token is None:
            return
        try:
            await self._store.mark_turn_ending(self.session_id, self._turn_token)
        except SessionStoreUnavailable as error:
            logger.warning("session %s: could not mark its turn as ending: %s", self.session_id, error.detail)

    async def unlock_turn(self) -> None:
        """Release the turn lock if this request holds it (a store that does not answer releases
        it once it answers again, or lets it expire)."""
        token, self._turn_token = self._turn_token, None
        if token is None:
            return
        try:
            await self._store.unlock_turn(self.session_id, token)
        except SessionStoreUnavailable as error:
            logger.warning("turn lock of session %s not released yet: %s", self.session_id, error.detail)

    async def reload(self) -> None:
        """Re-read the session from its store, in place (what `get_session()` returned stays valid)."""
        fresh = await type(self).open(self.session_id, self._store, self._prompt_from_dict)
        self._data.clear()
        self._data.update(fresh.get_session())

    async def keep_turn_locked(self) -> None:
        """Refresh the held turn lock every third of its store's `lock_ttl`, for as long as it is
        held (a store whose locks never expire needs nothing).

        A store that stops answering does not stop the turn: the reply goes on, and the lock
        may expire meanwhile (the log says so).
        """
        if self._store.lock_ttl is None:
            return
        while True:
            await anyio.sleep(self._store.lock_ttl / 3)
            if self._turn_token is None:
                continue
            try:
                await self._store.refresh_turn(self.session_id, self._turn_token)
            except SessionStoreUnavailable as error:
                logger.warning("turn lock of session %s not refreshed: %s", self.session_id, error.detail)
