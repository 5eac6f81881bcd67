"""Server-side sessions: a signed cookie names the session, a store keeps its data.

The cookie carries only a random id (from `secrets`) and an HMAC of it, so a client can neither
forge another user's id nor read anything from it. Session data is stored as JSON: a
`ChatPrompt` goes in as its `to_dict()`, so nothing is ever unpickled from a store, and a
store shared by replicas (Redis, next) holds plain data any of them can read.
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

from chatstream_asgi.prompt import AbstractChatPrompt

#: The session key under which ChatStream (and the seed's callbacks) keep the conversation.
CHAT_PROMPT_KEY = "chat_prompt"
_SECRET_ENV = "CHATSTREAM_SECRET_KEY"


class SessionStore(Protocol):
    """Where session data lives between requests. Values are JSON-ready dicts."""

    async def load(self, session_id: str) -> dict[str, Any] | None:
        """The data saved under `session_id`, or None if there is none (or it expired)."""
        ...

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        """Replace the data under `session_id`."""
        ...

    async def delete(self, session_id: str) -> None:
        """Forget `session_id`."""
        ...


class MemoryStore:
    """In-process store: bounded (least recently used goes first) and expiring.

    Data is kept as JSON text, like a shared store would keep it, so a handler that mutates a
    loaded dict cannot change what is stored until it saves.
    """

    def __init__(self, max_sessions: int = 10000, ttl: float = 86400) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {max_sessions}")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive seconds, not {ttl}")
        self.max_sessions = max_sessions
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def load(self, session_id: str) -> dict[str, Any] | None:
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        expires, text = entry
        if expires <= time.monotonic():
            del self._entries[session_id]
            return None
        self._entries[session_id] = (time.monotonic() + self.ttl, text)  # use refreshes the TTL
        self._entries.move_to_end(session_id)
        data: dict[str, Any] = json.loads(text)
        return data

    async def save(self, session_id: str, data: dict[str, Any]) -> None:
        self._entries[session_id] = (time.monotonic() + self.ttl, json.dumps(data))
        self._entries.move_to_end(session_id)
        while len(self._entries) > self.max_sessions:
            self._entries.popitem(last=False)

    async def delete(self, session_id: str) -> None:
        self._entries.pop(session_id, None)


class CookieSigner:
    """Signs session ids for the cookie and checks them on the way back in."""

    def __init__(self, secret_key: str | bytes | None) -> None:
        if secret_key is None:
            secret_key = os.environ.get(_SECRET_ENV) or secrets.token_bytes(32)
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
        if not session_id or not hmac.compare_digest(mac, self._mac(session_id)):
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
            return cls(CookieSigner.new_session_id(), {}, is_new=True, store=store, prompt_from_dict=prompt_from_dict)
        data = dict(await store.load(session_id) or {})
        if isinstance(data.get(CHAT_PROMPT_KEY), dict):
            data[CHAT_PROMPT_KEY] = prompt_from_dict(data[CHAT_PROMPT_KEY])
        return cls(session_id, data, is_new=False, store=store, prompt_from_dict=prompt_from_dict)

    def get_session(self) -> dict[str, Any]:
        """The session's data; keep JSON-ready values (and the `chat_prompt`) in it."""
        return self._data

    def save_session(self) -> None:
        """Mark the session to be stored when the turn or request ends."""
        self._dirty = True

    async def persist(self) -> None:
        """Write the session to its store if it was marked; the chat path awaits this itself."""
        if not self._dirty:
            return
        data = dict(self._data)
        prompt = data.get(CHAT_PROMPT_KEY)
        if isinstance(prompt, AbstractChatPrompt):
            data[CHAT_PROMPT_KEY] = prompt.to_dict()
        await self._store.save(self.session_id, data)
        self._dirty = False
