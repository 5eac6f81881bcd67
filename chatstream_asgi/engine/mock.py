"""`MockEngine`: replies without a model, at a steady token rate (ChatStream's `use_mock_response`).

For front-end work and fast start-up: it echoes the user's last message (or says fixed text)
in word-sized pieces, paced on the event loop's clock, and honours max_new_tokens, stop
strings and cancellation exactly as a real engine does.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

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
