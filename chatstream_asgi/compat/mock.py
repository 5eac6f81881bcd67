"""ChatStream's mock modes: `ChatStream(use_mock_response=True, mock_params={...})`.

They pick what the `MockEngine` says, in ChatStream's terms, so a front-end can be built and
tested without a model.
"""

from __future__ import annotations

import math
from typing import Any

from chatstream_asgi.engine.mock import MockEngine

#: ChatStream's "round" mock: short replies, one per turn, in turn (our own words).
ROUND_REPLIES = (
    "Hello! This is a mock reply: no model was loaded.",
    "The second turn of this conversation gets this second reply.",
    "Mock replies go round: the next turn starts again from the first.",
    "こんにちは。これはモックの応答です。",
)

#: ChatStream's "long" mock: a reply long enough to watch streaming, scrolling and Stop.
LONG_REPLY = " ".join(
    [
        "This is a long mock reply, streamed piece by piece so that a front-end can be built and",
        "tested without loading a model. It goes on for several sentences on purpose: long enough to",
        "see the text arrive at a steady pace, to scroll, and to press Stop half way through and watch",
        "the stream end at once. Nothing here comes from a language model; the pieces are cut from this",
        "paragraph and sent at the rate the mock parameters ask for. When the paragraph is over, the",
        "reply ends as a real one does, and the conversation keeps it in its history like any other.",
    ]
)


def mock_engine(mock_params: dict[str, Any] | None) -> MockEngine:
    """The engine ChatStream's `use_mock_response=True` asks for.

    `mock_params` as ChatStream's: `type` "round" (a reply per turn), "long" (a long text) or
    "echo" (the user's message), and `time_per_token_sec` (0.1; 0 sends as fast as it can).
    None: echo at 20 pieces a second.
    """
    if mock_params is None:
        return MockEngine()
    seconds = mock_params.get("time_per_token_sec", 0.1)
    rate = 1.0 / seconds if seconds > 0 else math.inf
    kind = mock_params.get("type", "round")
    if kind == "round":
        return MockEngine(rounds=ROUND_REPLIES, tokens_per_second=rate)
    if kind == "long":
        return MockEngine(LONG_REPLY, tokens_per_second=rate)
    if kind == "echo":
        return MockEngine(tokens_per_second=rate)
    raise ValueError(f"mock_params type must be 'round', 'long' or 'echo', not {kind!r}")
