"""Moved to `chatstream_asgi.sessions`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.sessions`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.sessions.memory import MemoryStore
from chatstream_asgi.sessions.session import ENDING_TURN_WAIT, STOP_SETTLE, Session
from chatstream_asgi.sessions.signing import SECRET_KEY_ENV, CookieSigner
from chatstream_asgi.sessions.store import (
    CHAT_PROMPT_KEY,
    DEFAULT_MAX_SESSION_BYTES,
    DEFAULT_MAX_TURNS,
    GENERATION_PARAMS_KEY,
    SessionStore,
    TurnSession,
    stored_text,
    trim_turns,
)

warnings.warn(
    f"{__name__} moved to chatstream_asgi.sessions",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CHAT_PROMPT_KEY",
    "CookieSigner",
    "DEFAULT_MAX_SESSION_BYTES",
    "DEFAULT_MAX_TURNS",
    "ENDING_TURN_WAIT",
    "GENERATION_PARAMS_KEY",
    "MemoryStore",
    "SECRET_KEY_ENV",
    "STOP_SETTLE",
    "Session",
    "SessionStore",
    "TurnSession",
    "stored_text",
    "trim_turns",
]
