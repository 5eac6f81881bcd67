"""Signed session cookies: the cookie carries only a random id (from `secrets`) and an HMAC of it,
so a client can neither forge another user's id nor read anything from it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

#: The environment variable holding the cookie key replicas share.
SECRET_KEY_ENV = "CHATSTREAM_SECRET_KEY"


class CookieSigner:
    """Signs session ids for the cookie and checks them on the way back in."""

    def __init__(self, secret_key: str | bytes | None) -> None:
        if secret_key is None:
            secret_key = os.environ.get(SECRET_KEY_ENV) or secrets.token_bytes(32)
        self._key = secret_key.encode() if isinstance(secret_key, str) else secret_key

    @staticmethod
    def new_session_id() -> str:
        """A fresh unguessable id."""
        return secrets.token_urlsafe(24)

    def sign(self, session_id: str) -> str:
        """The cookie value for `session_id`."""
        return f"{session_id}.{self._mac(session_id)}"

    def unsign(self, cookie_value: str) -> str | None:
        """The session id in a cookie value, or None if it was not signed by us."""
        session_id, _, mac = cookie_value.rpartition(".")
        # Compared as bytes: a cookie may carry any byte, and compare_digest refuses non-ASCII str.
        if not session_id or not hmac.compare_digest(mac.encode(), self._mac(session_id).encode()):
            return None
        return session_id

    def _mac(self, session_id: str) -> str:
        digest = hmac.new(self._key, session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
