"""Moved to `chatstream_asgi.frontends.demo_model`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.frontends.demo_model`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.frontends.demo_model import (
    CHAT_TEMPLATE,
    EOS_TOKEN,
    build_demo_model,
    default_demo_path,
    ensure_demo_model,
)

warnings.warn(
    f"{__name__} moved to chatstream_asgi.frontends.demo_model",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "build_demo_model",
    "default_demo_path",
    "ensure_demo_model",
]
