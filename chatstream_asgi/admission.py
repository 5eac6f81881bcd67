"""Who may generate now, who waits, where it runs, and who is turned away.

One anyio `CapacityLimiter` holds the running generations of all model replicas (slots per
replica times replicas); its own FIFO wait list is the one queue they share, bounded by
`max_queue_size`. A request that gets a slot goes to the replica running the fewest
generations. The limiter's `statistics()` is the only count of the whole, so the load snapshot
and the 429 decision can never disagree with what the limiter really holds. A slot is borrowed
on behalf of a per-request token rather than the calling task, because the task that admits a
request (the endpoint) is not the one that streams it (the response).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from chatstream_asgi.errors import TooManyRequests

# Weight of the newest hold time in the running average behind Retry-After.
_HOLD_SMOOTHING = 0.2


@dataclass(frozen=True)
class Load:
    """A snapshot of the admission state (`chat_stream.load()`, `/get_load`)."""

    processing: int
    waiting: int
    num_of_concurrent_executions: int
    max_queue_size: int

    def as_dict(self) -> dict[str, int]:
        """JSON-ready form."""
        return {
            "processing": self.processing,
            "waiting": self.waiting,
            "num_of_concurrent_executions": self.num_of_concurrent_executions,
            "max_queue_size": self.max_queue_size,
        }


class Slot:
    """A held generation slot on replica `replica`; `release()` gives it back (once)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._acquired_at = time.monotonic()
        self.replica = 0
        self.released = False

    def release(self) -> None:
        """Free the slot for the next waiter."""
        if not self.released:
            self.released = True
            self._admission._release(self, time.monotonic() - self._acquired_at)


class Admission:
    """Concurrency limit plus a bounded FIFO wait; see the module docstring."""

    def __init__(self, num_of_concurrent_executions: int, max_queue_size: int, replicas: int = 1) -> None:
        if num_of_concurrent_executions < 1:
            raise ValueError(f"num_of_concurrent_executions must be at least 1, not {num_of_concurrent_executions}")
        if max_queue_size < 0:
            raise ValueError(f"max_queue_size must be 0 or more, not {max_queue_size}")
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        self._slots = num_of_concurrent_executions * replicas
        self._max_queue_size = max_queue_size
        self._limiter = anyio.CapacityLimiter(self._slots)
        # Generations running on each replica; they add up to the limiter's borrowed tokens.
        self._running = [0] * replicas
        self._average_hold: float | None = None

    def load(self) -> Load:
        """How many generate, how many wait, and the limits."""
        stats = self._limiter.statistics()
        return Load(stats.borrowed_tokens, stats.tasks_waiting, self._slots, self._max_queue_size)

    async def admit(self, client_left: anyio.Event) -> Slot | None:
        """Wait for a slot in FIFO order; None if `client_left` fires first.

        Raises `TooManyRequests` at once when no slot is free and the queue is full.
        """
        slot = Slot(self)
        try:
            self._limiter.acquire_on_behalf_of_nowait(slot)
            return self._place(slot)
        except anyio.WouldBlock:
            pass
        if self._limiter.statistics().tasks_waiting >= self._max_queue_size:
            raise TooManyRequests(
                f"all {self._slots} generation slots are busy and {self._max_queue_size} requests are waiting",
                retry_after=self.retry_after(),
            )
        acquired = False
        try:
            async with anyio.create_task_group() as task_group:

                async def give_up_when_client_leaves() -> None:
                    await client_left.wait()
                    task_group.cancel_scope.cancel()

                task_group.start_soon(give_up_when_client_leaves)
                await self._limiter.acquire_on_behalf_of(slot)
                self._place(slot)
                acquired = True
                task_group.cancel_scope.cancel()
        except BaseException:
            # Cancelled from outside (server stopping) right after the slot came free.
            if acquired:
                slot.release()
            raise
        if not acquired:
            return None
        if client_left.is_set():  # left in the same instant the slot came free
            slot.release()
            return None
        return slot

    def replica_load(self) -> list[int]:
        """Generations running on each replica."""
        return list(self._running)

    def retry_after(self) -> float:
        """Seconds until a retry is likely to get in: the queue ahead times the average hold."""
        stats = self._limiter.statistics()
        average = self._average_hold if self._average_hold is not None else 1.0
        return max(1.0, average * (stats.tasks_waiting + 1) / self._slots)

    def _place(self, slot: Slot) -> Slot:
        """Put a newly granted slot on the least-loaded replica (there is always a free one)."""
        slot.replica = min(range(len(self._running)), key=self._running.__getitem__)
        self._running[slot.replica] += 1
        slot._acquired_at = time.monotonic()
        return slot

    def _release(self, slot: Slot, held_for: float) -> None:
        self._running[slot.replica] -= 1
        self._limiter.release_on_behalf_of(slot)
        if self._average_hold is None:
            self._average_hold = held_for
        else:
            self._average_hold += _HOLD_SMOOTHING * (held_for - self._average_hold)
