"""`MockEngine`: replies without a model, at a steady token rate (ChatStream's `use_mock_response`).

For front-end work and fast start-up: it echoes the user's last message (or says fixed text)
in word-sized pieces, paced on the event loop's clock, and honours max_new_tokens, stop
strings and cancellation exactly as a real engine does.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel

from chatstream_asgi.core.detokenize import StopStringFilter
from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.engine.base import Generation, GenerationStats

# Pieces about the size of subword tokens: up to four non-space characters, with leading spaces.
_PIECES = re.compile(r"\s*\S{1,4}|\s+")


class _MockGeneration:
    def __init__(
        self, pieces: list[str], truncated: bool, interval: float, stop: StopStringFilter, stats: GenerationStats
    ) -> None:
        self.stats = stats
        self._pieces = pieces
        self._truncated = truncated
        self._interval = interval
        self._stop = stop
        self._sent = 0
        self._started = anyio.current_time()
        self._cancelled = False

    async def next_text(self, timeout: float) -> str | None:
        if self._cancelled or self._stop.stopped or self._sent >= len(self._pieces):
            await anyio.lowlevel.checkpoint()
            if self.stats.finish_reason is None:
                self._finish()
            return None
        due = self._started + (self._sent + 1) * self._interval
        wait = due - anyio.current_time()
        if wait > timeout:
            await anyio.sleep(timeout)
            return ""
        await anyio.sleep(max(wait, 0))
        if self._cancelled:
            return await self.next_text(timeout)
        piece = self._pieces[self._sent]
        self._sent += 1
        self.stats.completion_tokens = self._sent
        text = self._stop.feed(piece)
        if self._sent == len(self._pieces) and not self._stop.stopped:
            text += self._stop.flush()
        return text

    def cancel(self) -> None:
        self._cancelled = True

    def _finish(self) -> None:
        if self._cancelled:
            self.stats.finish_reason = "cancelled"
        elif self._sent >= len(self._pieces) and self._truncated:
            self.stats.finish_reason = "length"
        else:
            self.stats.finish_reason = "stop"


class MockEngine:
    """Echoes the user's last message, or says `text`, at `tokens_per_second` pieces a second.

    `rounds` (ChatStream's "round" mock) replies by turn instead: the Nth turn of a conversation
    says `rounds[(N - 1) % len(rounds)]`.
    """

    ready = True

    def __init__(
        self, text: str | None = None, tokens_per_second: float = 20.0, *, rounds: Sequence[str] | None = None
    ) -> None:
        if tokens_per_second <= 0:
            raise ValueError(f"tokens_per_second must be positive, not {tokens_per_second}")
        if rounds is not None and not rounds:
            raise ValueError("rounds must hold at least one reply")
        self.text = text
        self.rounds = tuple(rounds) if rounds is not None else None
        self.tokens_per_second = tokens_per_second
        self.name_or_path = "mock"

    @asynccontextmanager
    async def generate(
        self, prompt: AbstractChatPrompt, params: GenerationParams, *, context_len: int
    ) -> AsyncIterator[Generation]:
        """The mock reply to `prompt`, as a generation."""
        if self.rounds is not None:
            reply = self.rounds[(max(prompt.get_turn(), 1) - 1) % len(self.rounds)]
        else:
            reply = self.text if self.text is not None else (prompt.get_requester_last_msg() or "")
        pieces = _PIECES.findall(reply)
        stats = GenerationStats(prompt_tokens=sum(len(_PIECES.findall(m["content"])) for m in prompt.to_messages()))
        generation = _MockGeneration(
            pieces[: params.max_new_tokens],
            len(pieces) > params.max_new_tokens,
            1.0 / self.tokens_per_second,
            StopStringFilter(list(params.stop) + prompt.generation_stop_strs()),
            stats,
        )
        try:
            yield generation
        finally:
            generation.cancel()

    def close(self) -> None:
        """Nothing to release."""


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
