"""Moved to `chatstream_asgi.sessions.redis_store`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.sessions.redis_store`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.sessions.redis_store import RedisStore

warnings.warn(
    f"{__name__} moved to chatstream_asgi.sessions.redis_store",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "RedisStore",
]
