"""ChatStream 0.3.0's observable defaults, behind one switch: `ChatStream(..., compat="chatstream")`.

Our defaults differ where ChatStream's hide a problem (200 for a full queue) or cost bytes (the
whole reply resent every chunk). An app moving over with a front-end that expects ChatStream's
behaviour gets all of it in one place instead of hunting arguments. An argument the caller
passes always wins over either set of defaults; that is why the constructor's defaults are the
`DEFAULT` marker rather than values.
"""

from __future__ import annotations

from typing import Any, Literal

Compat = Literal["chatstream"]
COMPAT_MODES: tuple[str, ...] = ("chatstream",)


class _Default:
    """Marks a constructor argument the caller did not pass."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: The default of every argument whose value depends on `compat`.
DEFAULT: Any = _Default()

#: Ours (DESIGN §3).
OUR_DEFAULTS: dict[str, Any] = {
    "name": None,
    "too_many_request_as_http_error": True,
    "context_len": 2048,
    "temperature": 0.7,
    "top_k": 50,
    "top_p": 0.9,
    "seed": None,
    "stream_format": "delta",
    "client_roles": None,
    "mock_params": None,
}

#: ChatStream 0.3.0's, where a client can observe them.
CHATSTREAM_DEFAULTS: dict[str, Any] = {
    "name": "node:0",
    "too_many_request_as_http_error": False,  # 200 + {"error": "too_many_requests"}
    "context_len": 1024,
    "temperature": 1.0,
    "top_k": None,  # top-k off
    "top_p": 1.0,
    "seed": 42,  # ChatStream calls set_seed(42) when it starts
    "stream_format": "chatstream",  # cumulative chunks ending in <::EOS::>
    # Its default role: a browser may chat, clear its context and send feedback, nothing else.
    "client_roles": {
        "user": {
            "apis": {
                "allow": ["chat_stream", "clear_context", "set_feedback"],
                "auth_method": "nothing",
                "use_session": True,
            }
        }
    },
    # ChatStream's default {type: "round"} is keyed by the builtin `type`, so it says the long text.
    "mock_params": {"type": "long"},
}


def resolve_defaults(compat: str | None, **given: Any) -> dict[str, Any]:
    """`given` with every `DEFAULT` replaced by the default of the `compat` mode (None: ours)."""
    if compat is not None and compat not in COMPAT_MODES:
        raise ValueError(f"compat must be None or one of {', '.join(COMPAT_MODES)}, not {compat!r}")
    defaults = CHATSTREAM_DEFAULTS if compat == "chatstream" else OUR_DEFAULTS
    return {key: defaults[key] if value is DEFAULT else value for key, value in given.items()}
