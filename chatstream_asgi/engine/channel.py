"""Text from an engine to the event loop, without either side blocking on the other.

The thread appends to a list under a lock and wakes the loop only when the loop is actually
waiting, so a reader that falls behind costs one wake-up for many tokens and receives them as
one batch. The loop waits on an `anyio.Event`, which can be abandoned (ping timeout, cancel)
without losing text: nothing is ever handed to a waiter that might not take it.

A producer on the loop itself (a remote engine's reader task) says so with `from_thread=False`
and wakes the reader directly. A producer that serves many channels at once (the batching
engine) gives them a `Wakeups` collector, and delivers every wake-up of a decode step in one
trip to the loop instead of one per row.
"""

from __future__ import annotations

import threading

import anyio
import anyio.from_thread
import anyio.lowlevel

from chatstream_asgi.engine.base import GenerationFailed


class Wakeups:
    """Wake-ups collected during one engine step, delivered together."""

    def __init__(self) -> None:
        self._pending: list[tuple[TextChannel, anyio.Event]] = []

    def add(self, channel: TextChannel, waiter: anyio.Event) -> None:
        """Remember to set `waiter` (the reader of `channel` is waiting on it)."""
        self._pending.append((channel, waiter))

    def deliver(self) -> None:
        """Set every collected waiter: one blocking call to each event loop involved."""
        pending, self._pending = self._pending, []
        by_loop: dict[int, list[tuple[TextChannel, anyio.Event]]] = {}
        for channel, waiter in pending:
            by_loop.setdefault(id(channel._token), []).append((channel, waiter))
        for group in by_loop.values():
            try:
                anyio.from_thread.run_sync(_set_all, [waiter for _, waiter in group], token=group[0][0]._token)
            except anyio.RunFinishedError:
                for channel, _ in group:
                    channel.loop_gone = True


def _set_all(events: list[anyio.Event]) -> None:
    for event in events:
        event.set()


class TextChannel:
    """One generation's stream of text deltas; written by a thread (or a task), read on the loop."""

    def __init__(self, *, from_thread: bool = True) -> None:
        # Taken on the loop: an engine's own thread is not an anyio worker thread.
        self._token = anyio.lowlevel.current_token() if from_thread else None
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._ended = False
        self._error: GenerationFailed | None = None
        self._waiter: anyio.Event | None = None
        self.loop_gone = False
        #: When set, wake-ups are collected here for the producer to deliver (see `Wakeups`).
        self.wakeups: Wakeups | None = None

    @property
    def ended(self) -> bool:
        """True once the producer has called `end`."""
        return self._ended

    # -- producer side ---------------------------------------------------------------------

    def put(self, text: str) -> None:
        """Queue `text` for the loop."""
        if text:
            self._publish(lambda: self._pending.append(text))

    def end(self, error: GenerationFailed | None = None) -> None:
        """Mark the generation finished (or failed); the reader sees it after the queued text."""

        def finish() -> None:
            self._ended = True
            self._error = error

        self._publish(finish)

    def _publish(self, change: object) -> None:
        with self._lock:
            change()  # type: ignore[operator]
            waiter, self._waiter = self._waiter, None
        if waiter is None:
            return
        if self._token is None:
            waiter.set()
            return
        if self.wakeups is not None:
            self.wakeups.add(self, waiter)
            return
        try:
            anyio.from_thread.run_sync(waiter.set, token=self._token)
        except anyio.RunFinishedError:
            # The event loop has stopped (server shutdown): nobody is left to read.
            self.loop_gone = True

    # -- loop side -----------------------------------------------------------------------

    async def receive(self, timeout: float) -> str | None:
        """Everything queued since the last call; "" after `timeout` s of silence; None at the end."""
        waited = False
        while True:
            with self._lock:
                ready = self._take()
                ended = self._ended
                if ready is None and not ended and not waited:
                    waiter = self._waiter = anyio.Event()
                elif self._waiter is not None:
                    self._waiter = None
            if ready is not None:
                await anyio.lowlevel.checkpoint()
                return ready
            if ended:
                await anyio.lowlevel.checkpoint()
                if self._error is not None:
                    raise self._error
                return None
            if waited:
                return ""
            with anyio.move_on_after(timeout) as scope:
                await waiter.wait()
            # Woken: take what came. Timed out: one last look, then report the silence.
            waited = scope.cancelled_caught

    def _take(self) -> str | None:
        if not self._pending:
            return None
        text = "".join(self._pending)
        self._pending.clear()
        return text
