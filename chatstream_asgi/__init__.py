"""chatstream-asgi: a production streaming-chat server for LLMs, as a pure-ASGI middleware.

Names are imported on first use, so `chatstream-asgi serve` can tune the process (OpenMP's
spin-wait) before torch loads, and `import chatstream_asgi` itself stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chatstream_asgi.admission import Admission, Load
    from chatstream_asgi.chat_stream import ChatStream
    from chatstream_asgi.errors import ChatStreamError
    from chatstream_asgi.middleware import ChatStreamMiddleware
    from chatstream_asgi.params import GenerationParams
    from chatstream_asgi.prompt import AbstractChatPrompt, ChatContent, ChatPrompt, RoleType
    from chatstream_asgi.redis_store import RedisStore
    from chatstream_asgi.session import MemoryStore, Session, SessionStore
    from chatstream_asgi.turn import (
        CLIENT_DISCONNECTED_BEFORE_STREAMING,
        CLIENT_DISCONNECTED_WHILE_STREAMING,
        SUCCESS,
        UNKNOWN_ERROR_OCCURRED,
    )

__version__ = "0.1.0"

_HOMES = {
    "Admission": "admission",
    "Load": "admission",
    "ChatStream": "chat_stream",
    "ChatStreamError": "errors",
    "ChatStreamMiddleware": "middleware",
    "GenerationParams": "params",
    "AbstractChatPrompt": "prompt",
    "ChatContent": "prompt",
    "ChatPrompt": "prompt",
    "RoleType": "prompt",
    "RedisStore": "redis_store",
    "MemoryStore": "session",
    "Session": "session",
    "SessionStore": "session",
    "CLIENT_DISCONNECTED_BEFORE_STREAMING": "turn",
    "CLIENT_DISCONNECTED_WHILE_STREAMING": "turn",
    "SUCCESS": "turn",
    "UNKNOWN_ERROR_OCCURRED": "turn",
}

__all__ = [
    "Admission",
    "Load",
    "ChatStream",
    "ChatStreamError",
    "ChatStreamMiddleware",
    "GenerationParams",
    "AbstractChatPrompt",
    "ChatContent",
    "ChatPrompt",
    "RoleType",
    "RedisStore",
    "MemoryStore",
    "Session",
    "SessionStore",
    "CLIENT_DISCONNECTED_BEFORE_STREAMING",
    "CLIENT_DISCONNECTED_WHILE_STREAMING",
    "SUCCESS",
    "UNKNOWN_ERROR_OCCURRED",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'chatstream_asgi' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"chatstream_asgi.{home}"), name)
    globals()[name] = value
    return value
