"""Moved to `chatstream_asgi.compat.chat_stream`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.compat.chat_stream`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.compat.chat_stream import ChatStream

warnings.warn(
    f"{__name__} moved to chatstream_asgi.compat.chat_stream",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ChatStream",
]
