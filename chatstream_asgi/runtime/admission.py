"""Who may generate now, who waits (in what order, for how long), where it runs, who is turned away.

One anyio `CapacityLimiter` holds the running generations of all model replicas (slots per
replica times replicas); its `statistics()` is the only count of them. Waiters do not queue on
the limiter: they hold a `Ticket` in one queue of our own, bounded by `max_queue_size` and
shared by the replicas, because a waiting client is told its position and the order may be
fair rather than first-come. A freed slot is handed straight to the next ticket (never left
for a newcomer to grab), so positions, load figures and `Retry-After` describe what really
happens. `"fifo"` serves tickets in arrival order; `"fair"` takes turns between clients (API
keys or addresses), FIFO within one client, and a full queue is shared: a client arriving at a
full queue takes the place of the newest waiter of the client holding the most places, when that
client holds at least two more than the newcomer (that waiter gets 429), so one client cannot
fill the queue and keep everyone else out, as turns alone would let it. A request that gets a
slot goes to the replica it prefers if that one has a free slot (the replica whose conversation
cache holds its chat), else to the replica running the fewest generations. A slot is borrowed
on behalf of the slot object rather than the calling task, because the task that admits a
request (the endpoint) is not the one that streams it (the response).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Literal

import anyio

from chatstream_asgi.errors import QueueTimeout, TooManyRequests

#: How waiters take turns: arrival order, or round-robin between clients.
AdmissionPolicy = Literal["fifo", "fair"]
ADMISSION_POLICIES: tuple[AdmissionPolicy, ...] = ("fifo", "fair")

#: What a waiter is told while it waits: `(position, eta_s)`, position 1 being next.
PositionReport = Callable[[int, float | None], Awaitable[None]]

# Weight of the newest hold time in the running average behind Retry-After and ETAs.
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


class Ticket:
    """One request's place in the queue: granted a `slot` at once, later, or never."""

    def __init__(
        self, admission: Admission, client: Hashable, max_wait: float | None, prefer: int | None = None
    ) -> None:
        self._admission = admission
        self.client = client
        #: The replica to run on when it has a free slot (the one holding the conversation's cache).
        self.prefer = prefer
        self._deadline = math.inf if max_wait is None else anyio.current_time() + max_wait
        #: The slot, once granted.
        self.slot: Slot | None = None
        #: Why the ticket lost its place to another client's (fair admission, a full queue).
        self.refused: TooManyRequests | None = None
        self.done = False
        # Set whenever the queue changes (a grant or a move), so a waiter can look again.
        self._changed = anyio.Event()

    def position(self) -> int:
        """1 when this ticket is next; 0 once it holds its slot or has left."""
        if self.slot is not None or self.done:
            return 0
        return self._admission._queue.position(self)

    def eta_s(self) -> float | None:
        """Seconds until the slot is likely granted, from the measured time a generation holds
        one; None until a generation has finished (no figure is better than a made-up one)."""
        estimate = self._admission.estimate(self.position())
        return None if estimate is None else round(estimate, 1)

    async def wait(
        self, client_left: anyio.Event, report: PositionReport | None = None, every: float = math.inf
    ) -> Slot | None:
        """The slot once granted; None if `client_left` fires first; `QueueTimeout` at the deadline;
        `TooManyRequests` if another client's ticket took its place (`Admission.enter`).

        `report(position, eta_s)` hears the position at once, whenever it changes and at least
        every `every` seconds. Whatever ends the wait, a ticket that did not get its slot (or
        got it too late for a client that left or a caller that was cancelled) leaves at once.
        """
        try:
            with anyio.CancelScope(deadline=self._deadline):
                async with anyio.create_task_group() as task_group:

                    async def give_up_when_client_leaves() -> None:
                        await client_left.wait()
                        task_group.cancel_scope.cancel()

                    task_group.start_soon(give_up_when_client_leaves)
                    await self._wait_for_slot(report, every)
                    task_group.cancel_scope.cancel()
        except BaseException:
            self.leave()
            raise
        if self.slot is not None and not client_left.is_set():
            self.done = True
            return self.slot
        self.leave()
        if client_left.is_set():
            return None
        if self.refused is not None:
            raise self.refused
        raise QueueTimeout("waited past its deadline for a generation slot", retry_after=self._admission.retry_after())

    def leave(self) -> None:
        """Give up the place, or the slot if it was granted but will not be used."""
        if self.done:
            return
        self.done = True
        if self.slot is not None:
            self.slot.release()
        else:
            self._admission._leave(self)

    async def _wait_for_slot(self, report: PositionReport | None, every: float) -> None:
        reported = 0
        next_report = -math.inf
        while self.slot is None and self.refused is None:
            self._changed = anyio.Event()  # renewed before looking, so no change goes unseen
            position = self.position()
            if report is not None and (position != reported or anyio.current_time() >= next_report):
                await report(position, self.eta_s())
                reported, next_report = position, anyio.current_time() + every
                continue
            with anyio.move_on_after(next_report - anyio.current_time() if report is not None else math.inf):
                await self._changed.wait()


class _WaitQueue:
    """Tickets by client, served round-robin across clients and FIFO within one client.

    The dict's order is the rotation: the client at its head is served next and, if it still
    waits for more, goes to the back. With one client (FIFO), this is a plain queue.
    """

    def __init__(self) -> None:
        self._lines: dict[Hashable, deque[Ticket]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def tickets(self) -> list[Ticket]:
        """Every waiting ticket."""
        return [ticket for line in self._lines.values() for ticket in line]

    def push(self, ticket: Ticket) -> None:
        self._lines.setdefault(ticket.client, deque()).append(ticket)
        self._count += 1

    def pop_next(self) -> Ticket:
        client = next(iter(self._lines))
        line = self._lines.pop(client)
        ticket = line.popleft()
        if line:
            self._lines[client] = line
        self._count -= 1
        return ticket

    def remove(self, ticket: Ticket) -> None:
        line = self._lines[ticket.client]
        line.remove(ticket)
        if not line:
            del self._lines[ticket.client]
        self._count -= 1

    def crowded_out_by(self, client: Hashable) -> Ticket | None:
        """The waiter that gives its place to a newcomer from `client` in a full queue: the newest
        of the client holding the most places, if it holds at least two more than `client` (one
        more, and the swap would only change who holds more)."""
        if not self._lines:
            return None
        crowding = max(self._lines.values(), key=len)
        return crowding[-1] if len(crowding) >= len(self._lines.get(client, ())) + 2 else None

    def position(self, ticket: Ticket) -> int:
        """The ticket's turn if nobody else arrives: every client's first `index` waiters go
        before it, and so does the next one of each client ahead of its own in the rotation."""
        index = self._lines[ticket.client].index(ticket)
        ahead = 0
        own_client_passed = False
        for client, line in self._lines.items():
            own_client_passed = own_client_passed or client == ticket.client
            ahead += min(len(line), index) + (0 if own_client_passed or len(line) <= index else 1)
        return ahead + 1


class Admission:
    """Concurrency limit plus a bounded, ordered wait; see the module docstring."""

    def __init__(
        self,
        num_of_concurrent_executions: int,
        max_queue_size: int,
        replicas: int = 1,
        policy: AdmissionPolicy = "fifo",
    ) -> None:
        if num_of_concurrent_executions < 1:
            raise ValueError(f"num_of_concurrent_executions must be at least 1, not {num_of_concurrent_executions}")
        if max_queue_size < 0:
            raise ValueError(f"max_queue_size must be 0 or more, not {max_queue_size}")
        if replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {replicas}")
        if policy not in ADMISSION_POLICIES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_POLICIES)}, not {policy!r}")
        self._slots = num_of_concurrent_executions * replicas
        self._per_replica = num_of_concurrent_executions
        self._max_queue_size = max_queue_size
        #: How waiters take turns.
        self.policy = policy
        self._fair = policy == "fair"
        self._limiter = anyio.CapacityLimiter(self._slots)
        self._queue = _WaitQueue()
        # Generations running on each replica; they add up to the limiter's borrowed tokens.
        self._running = [0] * replicas
        self._average_hold: float | None = None

    def load(self) -> Load:
        """How many generate, how many wait, and the limits."""
        return Load(self._limiter.statistics().borrowed_tokens, len(self._queue), self._slots, self._max_queue_size)

    def enter(self, client: Hashable = None, max_wait: float | None = None, prefer: int | None = None) -> Ticket:
        """A ticket holding a free slot, or a place in the queue; `TooManyRequests` when it is full
        (under the fair policy, unless another client's waiter gives up its place: see the module
        docstring).

        `client` is who takes turns under the fair policy; `max_wait` (seconds) is the deadline;
        `prefer` is the replica to run on if it has a free slot when this ticket's turn comes.
        """
        ticket = Ticket(self, client if self._fair else None, max_wait, prefer)
        if not self._queue:
            slot = Slot(self)
            try:
                self._limiter.acquire_on_behalf_of_nowait(slot)
            except anyio.WouldBlock:
                pass
            else:
                ticket.slot = self._place(slot, prefer)
                return ticket
        crowded_out = self._room_for(ticket.client)
        if crowded_out is not None:
            self._queue.remove(crowded_out)
            crowded_out.done = True
            crowded_out.refused = TooManyRequests(
                f"the wait queue is full ({self._max_queue_size}) and this client held more of it than any "
                "other: its newest waiting request gave its place to another client's",
                retry_after=self.retry_after(),
            )
            crowded_out._changed.set()
        self._queue.push(ticket)
        self._wake_waiters()
        return ticket

    def check_room(self, client: Hashable = None) -> None:
        """Raise `TooManyRequests` now if `enter` would for `client` (every slot busy, the queue
        full), so that a handler refuses before work it would only undo: a turn lock in a shared
        store costs two round trips, and under overload most requests are refused."""
        self._room_for(client if self._fair else None)

    def _room_for(self, client: Hashable) -> Ticket | None:
        """None if a ticket of `client` fits in the queue; the waiter it would take the place of
        if the queue is full but fair turns give it one; else `TooManyRequests`."""
        if not ((self._queue or self._limiter.available_tokens < 1) and len(self._queue) >= self._max_queue_size):
            return None
        crowded_out = self._queue.crowded_out_by(client) if self._fair else None
        if crowded_out is None:
            raise TooManyRequests(
                f"all {self._slots} generation slots are busy and {self._max_queue_size} requests are waiting",
                retry_after=self.retry_after(),
            )
        return crowded_out

    async def admit(
        self, client_left: anyio.Event, client: Hashable = None, max_wait: float | None = None
    ) -> Slot | None:
        """Wait for a slot; None if `client_left` fires first.

        Raises `TooManyRequests` at once when no slot is free and the queue is full, and
        `QueueTimeout` when `max_wait` seconds pass first.
        """
        return await self.enter(client, max_wait).wait(client_left)

    def replica_load(self) -> list[int]:
        """Generations running on each replica."""
        return list(self._running)

    def estimate(self, position: int) -> float | None:
        """Seconds until the waiter at `position` likely gets a slot: position times the average
        hold of a slot, shared among the slots; None before any generation has finished."""
        if self._average_hold is None:
            return None
        return self._average_hold * position / self._slots

    def retry_after(self) -> float:
        """Seconds until a retry is likely to get in: the estimate for the back of the queue.
        `Retry-After` must say something even before any hold was measured: a second a slot."""
        position = len(self._queue) + 1
        estimate = self.estimate(position)
        return max(1.0, estimate if estimate is not None else position / self._slots)

    def _place(self, slot: Slot, prefer: int | None) -> Slot:
        """Put a newly granted slot on the `prefer`red replica if it has room, else on the
        least-loaded one (there is always a free one)."""
        if prefer is not None and 0 <= prefer < len(self._running) and self._running[prefer] < self._per_replica:
            slot.replica = prefer
        else:
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
        if self._queue:
            ticket = self._queue.pop_next()
            granted = Slot(self)
            self._limiter.acquire_on_behalf_of_nowait(granted)
            ticket.slot = self._place(granted, ticket.prefer)
            ticket._changed.set()
            self._wake_waiters()

    def _leave(self, ticket: Ticket) -> None:
        self._queue.remove(ticket)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """Wake every waiter to look at its position again."""
        for ticket in self._queue.tickets():
            ticket._changed.set()
