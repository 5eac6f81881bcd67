"""What a session store is, and what it keeps: the protocol, the keys, the stored form.

Session data is stored as JSON: a `ChatPrompt` goes in as its `to_dict()`, so nothing is ever
unpickled from a store, and a store shared by replicas (`RedisStore`) holds plain data any of
them can read. Stored conversations are bounded here once for every store (`stored_text`).
A store also keeps the per-session turn lock, so that a second turn of one conversation is
refused (409) wherever it lands, not only on the replica running the first.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

#: The session key under which ChatStream (and the seed's callbacks) keep the conversation.
CHAT_PROMPT_KEY = "chat_prompt"
#: The session key of the per-session generation parameters (`/set_generation_params`).
GENERATION_PARAMS_KEY = "generation_params"


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

    async def ping(self) -> None:
        """Return once the store answers; `SessionStoreUnavailable` if it does not (`/ready`
        asks; a store without `ping` is taken to be up)."""
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
