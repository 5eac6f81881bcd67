"""Moved to `chatstream_asgi.core.params`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.core.params`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.core.params import (
    MAX_SEED,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    SESSION_PARAM_NAMES,
    ChatTurnRequest,
    GenerationParams,
    parse_chat_request,
    parse_json_object,
    session_params_update,
    session_params_view,
)

warnings.warn(
    f"{__name__} moved to chatstream_asgi.core.params",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ChatTurnRequest",
    "GenerationParams",
    "MAX_SEED",
    "MAX_STOP_LENGTH",
    "MAX_STOP_STRINGS",
    "SESSION_PARAM_NAMES",
    "parse_chat_request",
    "parse_json_object",
    "session_params_update",
    "session_params_view",
]
