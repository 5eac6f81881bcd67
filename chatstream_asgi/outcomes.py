"""The four ways an admitted chat request ends, and the callback that hears it (DESIGN §3).

A leaf: every layer that ends a turn (the HTTP responses, the console, metrics) names the
outcome with these strings, so none of them has to import another to agree on the words.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.requests import Request

SUCCESS = "success"
CLIENT_DISCONNECTED_WHILE_STREAMING = "client_disconnected_while_streaming"
CLIENT_DISCONNECTED_BEFORE_STREAMING = "client_disconnected_before_streaming"
UNKNOWN_ERROR_OCCURRED = "unknown_error_occurred"
OUTCOMES = (SUCCESS, CLIENT_DISCONNECTED_WHILE_STREAMING, CLIENT_DISCONNECTED_BEFORE_STREAMING, UNKNOWN_ERROR_OCCURRED)

#: `callback(request, outcome)`, plain or async: called once per request that reached admission.
OutcomeCallback = Callable[["Request", str], "Awaitable[None] | None"]
