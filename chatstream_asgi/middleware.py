"""Moved to `chatstream_asgi.asgi.middleware`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.asgi.middleware`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.asgi.cookie_sessions import check_shared_key
from chatstream_asgi.asgi.middleware import FINISH_GRACE, ChatStreamMiddleware

warnings.warn(
    f"{__name__} moved to chatstream_asgi.asgi.middleware",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ChatStreamMiddleware",
    "FINISH_GRACE",
    "check_shared_key",
]
