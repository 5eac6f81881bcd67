"""The small protocol every engine speaks: start a generation, read text deltas, cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from chatstream_asgi.params import GenerationParams
from chatstream_asgi.prompt import AbstractChatPrompt


class GenerationFailed(Exception):
    """The engine could not finish a generation; the message says why (the cause is chained)."""


@dataclass
class GenerationStats:
    """What one generation did, filled in by the engine as it runs.

    `steps_after_cancel` counts decode steps the model finished after `cancel()` was called:
    the step already in flight, at most, when cancellation works as promised.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps_after_cancel: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"


class Generation(Protocol):
    """One running generation, seen from the event loop."""

    stats: GenerationStats

    async def next_text(self, timeout: float) -> str | None:
        """The text produced since the last call; "" after `timeout` seconds of silence.

        Returns None once the generation has ended, and raises `GenerationFailed` if it failed.
        """
        ...

    def cancel(self) -> None:
        """Ask the engine to stop after the step in flight. Safe to call more than once."""
        ...


class Engine(Protocol):
    """A source of generations (a local model, a remote server, a mock)."""

    @property
    def ready(self) -> bool:
        """True once the engine can start generations (model loaded, warmed up)."""
        ...

    def start_generation(self, prompt: AbstractChatPrompt, params: GenerationParams, *, context_len: int) -> Generation:
        """Begin generating the reply to `prompt` (a copy the engine may keep); call on the event loop."""
        ...

    def close(self) -> None:
        """Stop the engine's threads once running generations end."""
        ...
