"""Server-side sessions: a signed cookie names the session, a store keeps its data.

The cookie carries only a random id (from `secrets`) and an HMAC of it, so a client can neither
forge another user's id nor read anything from it. Session data is stored as JSON: a
`ChatPrompt` goes in as its `to_dict()`, so nothing is ever unpickled from a store, and a
store shared by replicas (`RedisStore`) holds plain data any of them can read.

A store also keeps the per-session turn lock, so that a second turn of one conversation is
refused (409) wherever it lands, not only on the replica running the first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from chatstream_asgi.asgi.telemetry import request_logger
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.errors import SessionStoreUnavailable, SessionValueNotStorable

logger = request_logger(__name__)

#: The session key under which ChatStream (and the seed's callbacks) keep the conversation.
CHAT_PROMPT_KEY = "chat_prompt"
#: The session key of the per-session generation parameters (`/set_generation_params`).
GENERATION_PARAMS_KEY = "generation_params"
SECRET_KEY_ENV = "CHATSTREAM_SECRET_KEY"
#: Seconds a new turn waits for the previous turn of its session to end after its client left.
ENDING_TURN_WAIT = 5.0
#: Seconds a new turn waits before calling a running turn busy: long enough for a Stop that went
#: to another replica (the client closing its stream) to be noted in the shared store.
STOP_SETTLE = 0.25
_LOCK_POLL = 0.02


class SessionStore(Protocol):
    """Where session data lives between requests. Values are JSON-ready dicts.

    Failures to reach the store raise `SessionStoreUnavailable`.
    """

    #: True when several processes share the store, so they must share the cookie key too.
    shared: bool
    #: Seconds a turn lock lives unless refreshed; None when locks never expire.
    lock_ttl: float | None

    async def load(self, session_id: str) -> dict[str, Any] | None:
        """The data saved under `session_id` (its TTL refreshed), or None if there is none."""
        ...

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        """Replace the data under `session_id`."""
        ...

    async def delete(self, session_id: str) -> None:
        """Forget `session_id`."""
        ...

    async def lock_turn(self, session_id: str) -> str | None:
        """Take the session's turn lock; a token to release it with, or None if it is held."""
        ...

    async def refresh_turn(self, session_id: str, token: str) -> None:
        """Extend a held lock's lifetime (stores whose locks expire)."""
        ...

    async def unlock_turn(self, session_id: str, token: str) -> None:
        """Release the lock if `token` still holds it."""
        ...

    async def mark_turn_ending(self, session_id: str, token: str) -> None:
        """Note that the turn holding the lock with `token` is ending (its client left)."""
        ...

    async def turn_ending(self, session_id: str) -> bool:
        """True while the lock's holder has said it is ending."""
        ...


class TurnSession(Protocol):
    """What a chat turn needs of a session: ours (`Session`), or one another middleware attached
    (`attached.AttachedSession`)."""

    session_id: str
    #: True for a session this request created (nothing to re-read from a store).
    is_new: bool

    def get_session(self) -> dict[str, Any]:
        """The live session dict (the conversation is under `"chat_prompt"`)."""
        ...

    def save_session(self) -> None:
        """Mark the session to be stored."""
        ...

    async def persist(self) -> None:
        """Store a marked session."""
        ...

    async def reload(self) -> None:
        """Re-read the session in place (another replica may have changed it)."""
        ...

    async def lock_turn(self) -> bool:
        """Take the conversation's turn lock; False if another turn holds it."""
        ...

    async def unlock_turn(self) -> None:
        """Release the turn lock if this request holds it."""
        ...


def trim_turns(data: dict[str, Any], max_turns: int | None) -> dict[str, Any]:
    """`data` with its stored conversation cut to the newest `max_turns` turns (a turn = a request
    and its replies)."""
    prompt = data.get(CHAT_PROMPT_KEY)
    if max_turns is None or not isinstance(prompt, dict):
        return data
    contents = prompt.get("chat_contents", [])
    starts = [i for i, c in enumerate(contents) if c.get("role_type") == "REQUESTER"]
    if len(starts) <= max_turns:
        return data
    kept = contents[starts[-max_turns] :]
    trimmed = {
        **prompt,
        "chat_contents": kept,
        "requester_messages": [c for c in kept if c.get("role_type") == "REQUESTER"],
        "responder_messages": [c for c in kept if c.get("role_type") == "RESPONDER"],
    }
    return {**data, CHAT_PROMPT_KEY: trimmed}


#: Default bounds of one stored conversation: its newest turns, and its size as stored JSON.
DEFAULT_MAX_TURNS = 100
DEFAULT_MAX_SESSION_BYTES = 1 << 20


def stored_text(data: dict[str, Any], max_turns: int | None, max_bytes: int | None) -> str:
    """`data` as the JSON a store keeps: its conversation cut to the newest `max_turns` turns,
    then, oldest first, to at most `max_bytes` (the newest turn always stays: it is what the
    next reply continues, and `max_body_size` already bounds it)."""
    data = trim_turns(data, max_turns)
    text = json.dumps(data)
    prompt = data.get(CHAT_PROMPT_KEY)
    if max_bytes is None or len(text) <= max_bytes or not isinstance(prompt, dict):
        return text
    contents = prompt.get("chat_contents", [])
    starts = [i for i, c in enumerate(contents) if c.get("role_type") == "REQUESTER"]
    if len(starts) < 2:
        return text
    # Each message is stored twice (in chat_contents and in its role's list).
    sizes = [2 * len(json.dumps(contents[a:b])) for a, b in zip(starts, [*starts[1:], len(contents)], strict=True)]
    excess, dropped = len(text) - max_bytes, 0
    while dropped < len(starts) - 1 and excess > 0:
        excess -= sizes[dropped]
        dropped += 1
    return json.dumps(trim_turns(data, len(starts) - dropped))


class MemoryStore:
    """In-process store: bounded (least recently used goes first) and expiring.

    Bounded by count and by bytes: `max_bytes` is the stored JSON of all sessions together, so
    a few clients with huge conversations cannot take the process's memory; each conversation
    keeps at most `max_turns` turns and `max_session_bytes` bytes.

    Data is kept as JSON text, like a shared store would keep it, so a handler that mutates a
    loaded dict cannot change what is stored until it saves.
    """

    shared: bool = False
    lock_ttl: float | None = None  # process-local locks die with the process

    def __init__(
        self,
        max_sessions: int = 10000,
        ttl: float = 86400,
        max_turns: int | None = DEFAULT_MAX_TURNS,
        max_session_bytes: int | None = DEFAULT_MAX_SESSION_BYTES,
        max_bytes: int = 256 << 20,
    ) -> None:
        if (max_session_bytes is not None and max_session_bytes < 1) or max_bytes < 1:
            raise ValueError("max_session_bytes and max_bytes must be at least 1 byte")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive seconds, not {ttl}")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be at least 1 (or None), not {max_turns}")
        self.max_sessions = max_sessions
        self.ttl = ttl
        self.max_turns = max_turns
        self.max_session_bytes = max_session_bytes
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._turn_locks: dict[str, str] = {}
        self._ending: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    async def load(self, session_id: str) -> dict[str, Any] | None:
        await anyio.lowlevel.checkpoint()
        return self.load_now(session_id)

    def load_now(self, session_id: str) -> dict[str, Any] | None:
        """`load` without waiting: memory answers at once, so a route's synchronous
        `request.state.session.get_session()` can open its session lazily."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        expires, text = entry
        if expires <= time.monotonic():
            self._forget(session_id)
            return None
        self._entries[session_id] = (time.monotonic() + self.ttl, text)  # use refreshes the TTL
        self._entries.move_to_end(session_id)
        data: dict[str, Any] = json.loads(text)
        return data

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        await anyio.lowlevel.checkpoint()
        text = stored_text(data, self.max_turns, self.max_session_bytes)
        self._forget(session_id)
        self._entries[session_id] = (time.monotonic() + self.ttl, text)
        self.stored_bytes += len(text)
        while len(self._entries) > self.max_sessions or (self.stored_bytes > self.max_bytes and len(self._entries) > 1):
            self._forget(next(iter(self._entries)))

    async def delete(self, session_id: str) -> None:
        await anyio.lowlevel.checkpoint()
        self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self.stored_bytes -= len(entry[1])

    async def lock_turn(self, session_id: str) -> str | None:
        await anyio.lowlevel.checkpoint()
        if session_id in self._turn_locks:
            return None
        token = self._turn_locks[session_id] = secrets.token_hex(8)
        return token

    async def refresh_turn(self, session_id: str, token: str) -> None:
        await anyio.lowlevel.checkpoint()  # nothing expires

    async def unlock_turn(self, session_id: str, token: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self._turn_locks.get(session_id) == token:
            del self._turn_locks[session_id]
            self._ending.discard(session_id)

    async def mark_turn_ending(self, session_id: str, token: str) -> None:
        await anyio.lowlevel.checkpoint()
        if self._turn_locks.get(session_id) == token:
            self._ending.add(session_id)

    async def turn_ending(self, session_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return session_id in self._ending


class CookieSigner:
    """Signs session ids for the cookie and checks them on the way back in."""

    def __init__(self, secret_key: str | bytes | None) -> None:
        if secret_key is None:
            secret_key = os.environ.get(SECRET_KEY_ENV) or secrets.token_bytes(32)
        self._key = secret_key.encode() if isinstance(secret_key, str) else secret_key

    @staticmethod
    def new_session_id() -> str:
        """A fresh unguessable id."""
        return secrets.token_urlsafe(24)

    def sign(self, session_id: str) -> str:
        """The cookie value for `session_id`."""
        return f"{session_id}.{self._mac(session_id)}"

    def unsign(self, cookie_value: str) -> str | None:
        """The session id in a cookie value, or None if it was not signed by us."""
        session_id, _, mac = cookie_value.rpartition(".")
        # Compared as bytes: a cookie may carry any byte, and compare_digest refuses non-ASCII str.
        if not session_id or not hmac.compare_digest(mac.encode(), self._mac(session_id).encode()):
            return None
        return session_id

    def _mac(self, session_id: str) -> str:
        digest = hmac.new(self._key, session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


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

    async def keep_turn_locked(self, every: float) -> None:
        """Refresh the held turn lock every `every` seconds, for as long as it is held.

        A store that stops answering does not stop the turn: the reply goes on, and the lock
        may expire meanwhile (the log says so).
        """
        while True:
            await anyio.sleep(every)
            if self._turn_token is None:
                continue
            try:
                await self._store.refresh_turn(self.session_id, self._turn_token)
            except SessionStoreUnavailable as error:
                logger.warning("turn lock of session %s not refreshed: %s", self.session_id, error.detail)
