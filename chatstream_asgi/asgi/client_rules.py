"""What the HTTP layer asks of per-client rules (ChatStream's `client_roles`), and how it answers.

The rules themselves live with ChatStream compatibility (`compat.roles`); they decide, and this
module turns a decision into HTTP: a `Forbidden` becomes 403 in ChatStream's shape, and a pass
phrase typed into the chat becomes a `RoleGrant` that the chat endpoint answers with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from chatstream_asgi.asgi.http_errors import error_response
from chatstream_asgi.errors import Forbidden


@dataclass(frozen=True)
class RoleGrant:
    """A client promoted to a role: what to tell it, and the response headers that go with it."""

    message: str
    headers: dict[str, str] = field(default_factory=dict)


class ClientRules(Protocol):
    """Which APIs a client may call, and whether a chat message promotes it."""

    def denial(self, headers: Headers, session: dict[str, Any] | None, api: str) -> Forbidden | None:
        """Why this client may not call `api`, or None if it may."""
        ...

    def promote(self, session: dict[str, Any], user_input: str) -> RoleGrant | None:
        """If `user_input` is a pass phrase, record the role in `session` and say so; else None."""
        ...


def refusal(rules: ClientRules | None, request: Request, session: dict[str, Any] | None, api: str) -> Response | None:
    """403 in ChatStream's shape if the request may not call `api`; None if it may."""
    if rules is None:
        return None
    denied = rules.denial(request.headers, session, api)
    return None if denied is None else error_response(denied, "chatstream")
