"""The session cookie's name, and reading it back so that another origin's cookie is never trusted.

Cookies are scoped by host, not by origin: a page on a sibling subdomain can set one for the
whole site (`Domain=example.com`), and a page on another port of the host can set one outright.
Such a tossed cookie named like ours reaches this server beside the visitor's own, in an order
the browser picks; a parser that keeps one of them (Starlette's keeps the last) may hand the
visitor's request to the attacker's session, where the visitor's messages then land for the
attacker to read. Two defences, both here:

- with `https_only`, the cookie is named `__Host-<name>`: a browser keeps a cookie of that name
  only if it is `Secure`, has `Path=/` and no `Domain`, so a sibling subdomain cannot set it;
- a `Cookie` header naming the session more than once is trusted for neither value: the request
  gets a fresh session (and a warning is logged). Picking either would let the attacker's win
  whenever the browser happens to send it in that place.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import Scope

from chatstream_asgi.log import request_logger

logger = request_logger(__name__)

#: The name prefix that binds a cookie to the host that set it (Secure, Path=/, no Domain).
HOST_PREFIX = "__Host-"
#: Prefixes browsers enforce; a name that already has one is taken as the user wrote it.
_SECURE_PREFIXES = (HOST_PREFIX, "__Secure-")


def session_cookie_name(name: str, *, https_only: bool) -> str:
    """The cookie name to use: `name`, prefixed with `__Host-` when the site is HTTPS-only
    (unless it already carries a prefix). A prefixed name without `https_only` is refused: a
    browser drops such a cookie unless it is `Secure`, so sessions would silently never stick."""
    if name.startswith(_SECURE_PREFIXES):
        if not https_only:
            raise ValueError(
                f"session_cookie {name!r}: browsers keep a {name.split('-', 2)[0]}- cookie only when it is Secure, "
                "so it needs https_only=True"
            )
        return name
    return HOST_PREFIX + name if https_only else name


def cookie_header(scope: Scope) -> str:
    """Every `Cookie` header of the request as one (a client may send several lines)."""
    return "; ".join(Headers(scope=scope).getlist("cookie"))


def carries_cookie(scope: Scope, name: str) -> bool:
    """Whether the request sends a cookie named `name`, whatever its value."""
    return _count(cookie_header(scope), name) > 0


def session_cookie_value(scope: Scope, name: str) -> str | None:
    """The value of the session cookie `name`; None when the request has none, or names it more
    than once (a cookie tossed by another origin beside the visitor's: see the module docstring)."""
    header = cookie_header(scope)
    count = _count(header, name)
    if count > 1:
        logger.warning(
            "the Cookie header names %s %d times (one tossed by another origin of the site?): starting a new session",
            name,
            count,
        )
        return None
    return cookie_parser(header).get(name) if count else None


def _count(header: str, name: str) -> int:
    """How many cookies in `header` are named `name`, split as Starlette's `cookie_parser` does."""
    return sum(1 for chunk in header.split(";") if "=" in chunk and chunk.split("=", 1)[0].strip() == name)
