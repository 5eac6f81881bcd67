"""Moved to `chatstream_asgi.core.prompt`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.core.prompt`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.core.prompt import (
    AbstractChatPrompt,
    ChatContent,
    ChatPrompt,
    PromptTTL,
    Replacements,
    RoleType,
    fit_prompt,
)

warnings.warn(
    f"{__name__} moved to chatstream_asgi.core.prompt",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "AbstractChatPrompt",
    "ChatContent",
    "ChatPrompt",
    "PromptTTL",
    "Replacements",
    "RoleType",
    "fit_prompt",
]
