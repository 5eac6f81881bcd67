"""Which requests may act on a conversation through its cookie: the guard against same-site CSRF.

`SameSite=Lax` keeps the session cookie off cross-*site* POSTs, but a site is a registrable
domain: a page on a sibling subdomain or on another port of the host is the same site, and its
form POST or `fetch(url, {mode: "no-cors", credentials: "include"})` carries the visitor's
cookie. Such a request, which a browser sends without asking the server first (no CORS
preflight), can only have a form or `text/plain` `Content-Type`, and carries its page's
`Origin`. So a POST that carries the session cookie must:

- come from this server's own origin or one in `allowed_origins`: judged by `Origin`, else by
  `Sec-Fetch-Site` (`same-origin`, or `none` for what the user typed), else allowed (no browser
  sent it: curl, a script); otherwise 403 `forbidden`. The own origin is the scheme the request
  arrived by (`scope["scheme"]`: uvicorn takes it from a trusted proxy's `X-Forwarded-Proto`;
  always `https` with `https_only`) and the `Host` it was sent to. The scheme is the server's, not
  the `Origin`'s: a page on `http://host` (whoever can inject into plain HTTP) is another origin
  than `https://host`;
- say `Content-Type: application/json`, which a page elsewhere cannot send without a
  preflight that this server never grants; otherwise 415 `unsupported_media_type`. A POST
  with no body at all has nothing to label (`/clear_context` as ChatStream's clients call it):
  it needs no `Content-Type`, and `Origin` alone decides.

A request without the cookie carries no ambient authority: whatever it does, it does to a
conversation of its own, so it is not checked (`curl -d '{"user_input": ...}'`, whose
`Content-Type` is a form's, keeps working). Nor is one whose API key the middleware verified
(`api_keys`): no page can hold the key. A bare `Authorization` header proves nothing, since a
CORS policy that grants every header lets any page add one. Django's and Rails' CSRF checks compare `Origin`
with the host the same way; there is no token, since every browser this guards sends `Origin`
on a POST.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.types import Scope

from chatstream_asgi.asgi.body import says_json
from chatstream_asgi.asgi.waiting import API_KEY_SCOPE_KEY
from chatstream_asgi.errors import ChatStreamError, Forbidden, UnsupportedMediaType, quoted
from chatstream_asgi.sessions.cookie import carries_cookie

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: `Sec-Fetch-Site` values of a request this server's own pages (or the user) made.
_OWN_FETCHES = frozenset({"same-origin", "none"})


def normalized_origin(text: str) -> str:
    """`text` as a browser spells an origin in `Origin`: `scheme://host[:port]`, lowercase, without
    the scheme's default port. ValueError for anything else (a path, a query, another scheme)."""
    parts = urllib.parse.urlsplit(text.strip().lower())
    try:
        port = parts.port
    except ValueError:
        port = -1  # not a port number: refused below
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or port == -1
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        raise ValueError(f"{quoted(text)} is not an origin such as https://chat.example.com or http://127.0.0.1:8000")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown_port = "" if port is None or port == _DEFAULT_PORTS[parts.scheme] else f":{port}"
    return f"{parts.scheme}://{host}{shown_port}"


class CookieGuard:
    """Refuses a cookie-carrying POST from another origin, or without a JSON body (module docstring)."""

    def __init__(self, cookie: str, allowed_origins: Iterable[str] = (), *, https_only: bool = False) -> None:
        if isinstance(allowed_origins, str):  # one origin given bare would be taken letter by letter
            raise ValueError(f"allowed_origins takes a list of origins, not the string {quoted(allowed_origins)}")
        self._cookie = cookie
        self._allowed = frozenset(normalized_origin(origin) for origin in allowed_origins)
        self._https_only = https_only

    def refusal(self, scope: Scope) -> ChatStreamError | None:
        """Why this request may not act on the cookie's conversation, or None when it may."""
        if API_KEY_SCOPE_KEY in scope or not carries_cookie(scope, self._cookie):
            return None
        headers = Headers(scope=scope)
        route = f"{scope['method']} {scope['path']}"
        own = self._own_origin(scope, headers)
        if not self._same_origin(headers, own):
            origin = headers.get("origin")
            fetch_site = headers.get("sec-fetch-site")
            came_from = f"the origin {quoted(origin)}" if origin is not None else f"Sec-Fetch-Site {quoted(fetch_site)}"
            return Forbidden(
                f"{route} from {came_from} may not use this server's session cookie: it is not the server's own "
                f"origin{_scheme_hint(origin, own)}; to let a page there call it, list its origin in "
                "allowed_origins (serve --allowed-origin)"
            )
        if not says_json(scope) and not _bodiless(headers):
            return UnsupportedMediaType(
                f"{route} with the session cookie takes Content-Type: application/json, which a page of another "
                "origin cannot send unasked (with curl: -H 'Content-Type: application/json')"
            )
        return None

    def _own_origin(self, scope: Scope, headers: Headers) -> str | None:
        """This server's origin as the request reached it: its scheme and the `Host` it was sent to."""
        scheme = "https" if self._https_only else scope.get("scheme", "http")
        try:
            return normalized_origin(f"{scheme}://{headers.get('host', '')}")
        except ValueError:  # no Host, or not a host: nothing is this server's origin
            return None

    def _same_origin(self, headers: Headers, own: str | None) -> bool:
        origin = headers.get("origin")
        if origin is None:
            fetch_site = headers.get("sec-fetch-site")
            return fetch_site is None or fetch_site.lower() in _OWN_FETCHES
        try:
            claimed = normalized_origin(origin)
        except ValueError:  # "null" (a sandboxed frame, a redirect) or garbage: no origin of ours
            return False
        return claimed in self._allowed or claimed == own


def _scheme_hint(origin: str | None, own: str | None) -> str:
    """A word on a refused `https` `origin` that is the server's own but for the scheme: behind a
    proxy that ends TLS, the server sees `http` unless it trusts the proxy's `X-Forwarded-Proto`."""
    if origin is None or own is None:
        return ""
    try:
        claimed = normalized_origin(origin)
    except ValueError:
        return ""
    if not (own.startswith("http://") and claimed == "https://" + own.partition("://")[2]):
        return ""
    return (
        f" (the request reached this server as {own}: behind a proxy that ends TLS, let uvicorn trust its "
        "X-Forwarded-Proto with --forwarded-allow-ips, or serve --https-only)"
    )


def _bodiless(headers: Headers) -> bool:
    """Whether the request has no body at all (`Content-Length: 0`, or neither a length nor chunks)."""
    length = headers.get("content-length")
    return length == "0" or (length is None and "transfer-encoding" not in headers)
