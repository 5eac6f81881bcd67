"""The small protocol every engine speaks: generate from a conversation, read text deltas, cancel.

`Engine.generate` is an async context manager so that every engine can tie its own clean-up to
the request's lifetime: on exit the generation is cancelled if it still runs, and the exit
returns only once the engine has really stopped (the model thread finished its step, the
upstream HTTP stream is closed). The caller frees the request's slot after that, never before.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from chatstream_asgi.core.params import GenerationParams
from chatstream_asgi.core.prompt import AbstractChatPrompt
from chatstream_asgi.errors import GenerationError


class GenerationFailed(Exception):
    """The engine could not finish a generation; the message says why (the cause is chained).

    `status_code` is the HTTP status that fits when nothing was sent yet: 500 for a local
    failure, 502 for a remote server's error, 504 for a remote server that timed out, 429 for a
    remote server that is busy; `retry_after` is then the seconds it asked its clients to wait.
    """

    def __init__(self, message: str, *, status_code: int = 500, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after

    def as_error(self) -> GenerationError:
        """This failure as the refusal a client gets (`generation_failed`, or a busy upstream's 429)."""
        return GenerationError(str(self), self.status_code, self.retry_after)


@dataclass
class GenerationStats:
    """What one generation did, filled in by the engine as it runs.

    `steps_after_cancel` counts decode steps the model finished after `cancel()` was called:
    the step already in flight, at most, when cancellation works as promised.
    """

    prompt_tokens: int = 0
    #: Of `prompt_tokens`, those whose keys and values came from the conversation cache.
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Of `completion_tokens`, those drafted by prompt lookup and kept (they cost no step of their own).
    drafted_tokens: int = 0
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

    def generate(
        self, prompt: AbstractChatPrompt, params: GenerationParams, *, context_len: int
    ) -> AbstractAsyncContextManager[Generation]:
        """Generate the reply to `prompt` (a copy the engine may keep) while the context is open."""
        ...

    def close(self) -> None:
        """Release the engine's threads or connections once running generations end."""
        ...
