"""The benchmark's HTTP client: what a user would write (httpx, async, every chunk read as it comes).

Each chat is a fresh `httpx.AsyncClient` (a new visitor, so a new session) unless a conversation
passes its own client along, whose cookie then carries the session from turn to turn. The client
runs in the benchmark's process, beside the server on the same cores, as a real client on the
same machine would: its own cost is part of what it measures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import httpx

PROMPT = "Tell me a long story about servers that stream text."

#: Sampling settings of each mode: greedy, and ChatStream's defaults (what a client gets unasked).
MODES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0},
    "sampled": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
}


@dataclass
class Reply:
    """One streamed reply as the client saw it: when it asked, when each chunk came, the text."""

    started: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    ended: float = 0.0

    @property
    def first_byte(self) -> float:
        """Seconds from asking to the first chunk of text."""
        return self.chunk_times[0] - self.started

    @property
    def seconds(self) -> float:
        """Seconds from asking to the last byte."""
        return self.ended - self.started


def body(mode: str, new_tokens: int, user_input: str = PROMPT) -> dict[str, Any]:
    """A /chat_stream request in `mode` ("greedy" or "sampled")."""
    settings = MODES[mode]
    wire = {"temperature": settings["temperature"]}
    if "top_k" in settings:
        wire |= {"top_k_value": settings["top_k"], "top_p_value": settings["top_p"]}
    return {"user_input": user_input, "max_new_tokens": new_tokens, **wire}


async def chat(
    url: str,
    request: dict[str, Any],
    *,
    client: httpx.AsyncClient | None = None,
    leave_after_first_chunk: bool = False,
    path: str = "/chat_stream",
    reply: Reply | None = None,
) -> Reply:
    """POST `request` and read the streamed reply chunk by chunk (or leave after the first).

    A `reply` passed in is filled as chunks come, for a caller that watches the stream live.
    """
    own = client is None
    http = client if client is not None else httpx.AsyncClient(base_url=url, timeout=300)
    try:
        if reply is None:
            reply = Reply(started=time.perf_counter())
        else:
            reply.started = time.perf_counter()
        async with http.stream("POST", path, json=request) as response:
            response.raise_for_status()
            async for chunk in response.aiter_text():
                if chunk:
                    reply.chunk_times.append(time.perf_counter())
                    reply.text += chunk
                    if leave_after_first_chunk:
                        break  # closing the stream unread closes the connection: the client left
        reply.ended = time.perf_counter()
        return reply
    finally:
        if own:
            await http.aclose()
