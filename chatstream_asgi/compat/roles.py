"""ChatStream's client roles: which APIs a client may call, and how it is promoted.

`ChatStream(client_roles={...})` takes ChatStream's dict as is: each role names its allowed APIs
(`"all"` or a list of API names) and how a client gets it (`auth_method`):

- `"nothing"` with `use_session: True`: the default role of a browser (exactly one is required);
  `"nothing"` with `use_session: False`: the default role of a program (optional);
- `"ui_pass_phrase"` / `"ui_pass_phrase_sha256"`: a browser typing the phrase into the chat is
  promoted for the rest of its session (the phrase is answered, never sent to the model);
- `"header_phrase"` / `"header_phrase_sha256"`: a program sending the phrase in the
  `X-ChatStream-Auth-Header` header gets the role for that request.

A request carrying a header that matches a program's role gets that role; otherwise a request
with a session is a browser (its promoted role, else the browser default), and one without is a
program (the program default, if any); on routes where the middleware opens sessions only when
read, a request without our session cookie counts as having none. A refused call gets 403 in
ChatStream's shape. Unlike ChatStream, a malformed definition (unknown API or method) is refused
when the server starts. `ClientRoles` only decides (`asgi.client_rules.ClientRules`); the HTTP
layer turns its decisions into responses.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers

from chatstream_asgi.asgi.client_rules import RoleGrant
from chatstream_asgi.errors import Forbidden

#: The session key ChatStream keeps a browser's current role under.
CLIENT_ROLE_KEY = "chat_stream_client_role"
AUTH_HEADER = "X-ChatStream-Auth-Header"
DEVTOOL_HEADER = "X-ChatStream-API-DevTool-Enabled"
#: The API names a role may allow (ChatStream's, the web page's included).
ROLE_API_NAMES = frozenset(
    {
        "chat_stream",
        "clear_context",
        "get_prompt",
        "set_generation_params",
        "get_generation_params",
        "set_feedback",
        "get_load",
        "get_resource_usage",
        "webui_index",
        "webui_js",
    }
)
_BROWSER_METHODS = ("ui_pass_phrase", "ui_pass_phrase_sha256")
_PROGRAM_METHODS = ("header_phrase", "header_phrase_sha256")


@dataclass(frozen=True)
class Role:
    """One role of `client_roles`."""

    name: str
    allowed: frozenset[str] | None  # None: "all"
    auth_method: str
    use_session: bool
    phrase: str | None
    enable_dev_tool: bool

    def allows(self, api: str) -> bool:
        """Whether this role may call `api`."""
        return self.allowed is None or api in self.allowed

    def as_session_value(self) -> dict[str, Any]:
        """The role as ChatStream keeps it in the session."""
        allowed = "all" if self.allowed is None else sorted(self.allowed)
        return {"client_role_name": self.name, "allowed_apis": allowed, "enable_dev_tool": self.enable_dev_tool}

    def matches(self, secret: str) -> bool:
        """Whether `secret` (typed or sent in the header) is this role's phrase."""
        if self.phrase is None:
            return False
        given = hashlib.sha256(secret.encode()).hexdigest() if self.auth_method.endswith("_sha256") else secret
        return hmac.compare_digest(given.encode(), self.phrase.encode())


class ClientRoles:
    """ChatStream's `client_roles`, checked once at start and applied per request."""

    def __init__(self, definition: dict[str, Any]) -> None:
        self.roles = {name: _parse_role(name, body) for name, body in definition.items()}
        browser_defaults = [r for r in self.roles.values() if r.auth_method == "nothing" and r.use_session]
        if len(browser_defaults) != 1:
            raise ValueError(
                "client_roles needs exactly one default role for browsers "
                f"(auth_method 'nothing', use_session True); found {len(browser_defaults)}"
            )
        self.browser_default = browser_defaults[0]
        self.program_default = next(
            (r for r in self.roles.values() if r.auth_method == "nothing" and not r.use_session), None
        )

    def role_for(self, headers: Headers, session: dict[str, Any] | None) -> Role | None:
        """The role of a request (see the module docstring); None: it has none, so nothing is allowed."""
        secret = headers.get(AUTH_HEADER)
        if secret is not None:
            for role in self.roles.values():
                if role.auth_method in _PROGRAM_METHODS and role.matches(secret):
                    return role
        if session is None:
            return self.program_default
        stored = session.get(CLIENT_ROLE_KEY)
        if isinstance(stored, dict) and stored.get("client_role_name") in self.roles:
            return self.roles[stored["client_role_name"]]
        return self.browser_default

    def promotion(self, user_input: str) -> Role | None:
        """The browser role whose pass phrase `user_input` is, if any."""
        if not user_input:
            return None
        for role in self.roles.values():
            if role.auth_method in _BROWSER_METHODS and role.matches(user_input):
                return role
        return None

    def denial(self, headers: Headers, session: dict[str, Any] | None, api: str) -> Forbidden | None:
        """Why the request's role may not call `api`; None if it may."""
        role = self.role_for(headers, session)
        if role is not None and role.allows(api):
            return None
        who = f"role {role.name!r}" if role is not None else "a client without a role"
        return Forbidden(f"Denied on role layer: {who} may not call {api}")

    def promote(self, session: dict[str, Any], user_input: str) -> RoleGrant | None:
        """Promote a browser's session when `user_input` is a pass phrase, as ChatStream does."""
        role = self.promotion(user_input)
        if role is None:
            return None
        session[CLIENT_ROLE_KEY] = role.as_session_value()
        headers = {DEVTOOL_HEADER: "enabled"} if role.enable_dev_tool else {}
        return RoleGrant(f"New role: '{role.name}' has been granted", headers)


def _parse_role(name: str, body: Any) -> Role:
    apis = body.get("apis") if isinstance(body, dict) else None
    if not isinstance(apis, dict):
        raise ValueError(f"client_roles[{name!r}] needs an 'apis' dict")
    allow = apis.get("allow")
    if allow == "all":
        allowed = None
    elif isinstance(allow, list) and all(api in ROLE_API_NAMES for api in allow):
        allowed = frozenset(allow)
    else:
        known = ", ".join(sorted(ROLE_API_NAMES))
        raise ValueError(f"client_roles[{name!r}]: 'allow' must be 'all' or a list of ({known}), not {allow!r}")
    method = apis.get("auth_method", "nothing")
    phrase_key = {
        "ui_pass_phrase": "ui_pass_phrase",
        "ui_pass_phrase_sha256": "ui_pass_phrase_sha256",
        "header_phrase": "header_phrase",
        "header_phrase_sha256": "header_phrase",  # ChatStream keeps the hash under header_phrase
    }
    if method != "nothing" and method not in phrase_key:
        raise ValueError(f"client_roles[{name!r}]: unknown auth_method {method!r}")
    phrase = apis.get(phrase_key[method]) if method != "nothing" else None
    if method != "nothing" and not (isinstance(phrase, str) and phrase):
        raise ValueError(f"client_roles[{name!r}]: auth_method {method!r} needs '{phrase_key[method]}'")
    use_session = bool(apis.get("use_session", False))
    if method in _BROWSER_METHODS and not use_session:
        raise ValueError(f"client_roles[{name!r}]: a pass phrase typed into the chat needs use_session: True")
    return Role(name, allowed, method, use_session, phrase, bool(apis.get("enable_dev_tool", False)))
