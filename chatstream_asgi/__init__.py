"""chatstream-asgi: a production streaming-chat server for LLMs, as a pure-ASGI middleware."""

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

__all__ = [
    "CLIENT_DISCONNECTED_BEFORE_STREAMING",
    "CLIENT_DISCONNECTED_WHILE_STREAMING",
    "SUCCESS",
    "UNKNOWN_ERROR_OCCURRED",
    "AbstractChatPrompt",
    "Admission",
    "ChatContent",
    "ChatPrompt",
    "ChatStream",
    "ChatStreamError",
    "ChatStreamMiddleware",
    "GenerationParams",
    "Load",
    "MemoryStore",
    "RedisStore",
    "RoleType",
    "Session",
    "SessionStore",
    "__version__",
]
