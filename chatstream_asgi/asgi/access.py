"""API keys and their scopes: who may call which route the middleware serves.

A key holds scopes: `chat` (`/chat_stream`, `/v1`), `apis` (ChatStream's conversation APIs) and
`admin` (`get_prompt`, `get_resource_usage`, `/metrics`: they show more than the caller's own
turn). `api_keys=["k"]` gives each key every scope; `{"k": ["chat"]}` names them. This module
imports nothing heavy, so the command line can check `--api-key KEY:SCOPE,...` before torch loads.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from chatstream_asgi.errors import ChatStreamError, Forbidden, Unauthorized

#: The scopes an API key may hold; a key given without scopes holds them all.
KEY_SCOPES = ("chat", "apis", "admin")
#: Conversation APIs that need `admin` rather than `apis`.
ADMIN_APIS = frozenset({"get_prompt", "get_resource_usage"})

ApiKeys = Sequence[str] | Mapping[str, Sequence[str]]


class KeyRing:
    """The configured keys, checked in constant time per key."""

    def __init__(self, api_keys: ApiKeys | None) -> None:
        if isinstance(api_keys, str):
            raise ValueError("api_keys must be a list of keys or a {key: [scopes]} mapping, not one string")
        pairs = list(api_keys.items()) if isinstance(api_keys, Mapping) else [(k, KEY_SCOPES) for k in api_keys or ()]
        self._keys: list[tuple[bytes, frozenset[str]]] = []
        for key, scopes in pairs:
            if not key:
                raise ValueError("api_keys must be non-empty keys")
            if isinstance(scopes, str) or not set(scopes) <= set(KEY_SCOPES):
                raise ValueError(f"the scopes of an API key are a list of {', '.join(KEY_SCOPES)}, not {scopes!r}")
            self._keys.append((key.encode(), frozenset(scopes)))

    def __bool__(self) -> bool:
        return bool(self._keys)

    def refusal(self, authorization: str, needed: str) -> ChatStreamError | None:
        """Why an `Authorization` header may not use a route needing `needed`: 401 without a
        valid bearer key, 403 with a key lacking the scope; None when it may."""
        scheme, _, given = authorization.partition(" ")
        given_key = given.strip().encode()
        scopes: frozenset[str] | None = None
        for key, key_scopes in self._keys:  # every key is compared: the time says nothing about which
            if hmac.compare_digest(given_key, key):
                scopes = key_scopes
        if scheme.lower() != "bearer" or scopes is None:
            return Unauthorized("a valid API key is required: Authorization: Bearer <key>")
        if needed not in scopes:
            return Forbidden(f"this API key lacks the {needed!r} scope this route needs")
        return None
