"""`MemoryStore`: sessions kept in this process, bounded and expiring."""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from typing import Any

import anyio
import anyio.lowlevel

from chatstream_asgi.sessions.store import DEFAULT_MAX_SESSION_BYTES, DEFAULT_MAX_TURNS, stored_text


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

    async def ping(self) -> None:
        """Memory always answers."""
        await anyio.lowlevel.checkpoint()

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
