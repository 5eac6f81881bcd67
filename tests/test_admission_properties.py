"""Property tests of admission over random arrival sequences, under both policies.

Hypothesis draws a server (slots, queue size, policy) and a sequence of events: a client's
request arrives, a running generation ends, a waiter goes (its client left, its deadline
passed, or the server is stopping: each ends a wait through `Ticket.leave`). After every
event the load figures must match what is really held and queued; in the end the queue
drains, and every request must have ended exactly once, in an order the policy allows. Under
the fair policy a full queue is shared: an arrival may take the place of another client's
newest waiter, which is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatstream_asgi.errors import TooManyRequests
from chatstream_asgi.runtime.admission import Admission, Ticket

pytestmark = pytest.mark.anyio

EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, 3)),
        st.tuples(st.just("finish"), st.integers(0, 20)),
        st.tuples(st.just("leave"), st.integers(0, 20)),
    ),
    max_size=60,
)


@dataclass
class Refusal:
    """A request refused at the door, with how many waiters each client held then."""

    client: int
    held: dict[int, int]
    max_queue_size: int


@dataclass
class Request:
    client: int
    ticket: Ticket
    grants_before_arrival: int
    ends: list[str] = field(default_factory=list)


class Run:
    """Drives an `Admission` and records how each request ends."""

    def __init__(self, slots: int, queue: int, policy: str) -> None:
        self.admission = Admission(slots, queue, policy=policy)  # type: ignore[arg-type]
        self.policy = policy
        self.slots = slots
        self.requests: list[Request] = []
        self.refused: list[Refusal] = []
        self.crowded_out: list[tuple[Request, int]] = []  # and how many waiters its client held
        self.served: list[Request] = []  # in the order slots were granted

    @property
    def waiting(self) -> list[Request]:
        return [r for r in self.requests if not r.ends]

    @property
    def running(self) -> list[Request]:
        return [r for r in self.requests if r.ends == ["served"]]

    def held(self) -> dict[int, int]:
        """How many waiters each client holds."""
        return dict(Counter(r.client for r in self.waiting))

    def arrive(self, client: int) -> None:
        held, waiting = self.held(), self.waiting
        try:
            ticket = self.admission.enter(client)
        except TooManyRequests:
            self.refused.append(Refusal(client, held, self.admission.load().max_queue_size))
            assert len(self.running) == self.slots and len(waiting) == self.admission.load().max_queue_size
            if self.policy == "fair":  # no client held two more places than this one, or it would have got one
                assert all(count <= held.get(client, 0) + 1 for count in held.values())
            return
        self.requests.append(Request(client, ticket, len(self.served)))
        crowded_out = [r for r in waiting if r.ticket.refused is not None]
        for request in crowded_out:
            request.ends.append("refused")
            self.crowded_out.append((request, held[request.client]))
        if crowded_out:
            # One waiter made room: the newest of a client holding the most, two or more above the newcomer.
            [request] = crowded_out
            assert self.policy == "fair" and len(waiting) == self.admission.load().max_queue_size
            assert held[request.client] == max(held.values()) >= held.get(client, 0) + 2
            assert request is [r for r in waiting if r.client == request.client][-1]
        self.collect_grants()

    def finish(self, index: int) -> None:
        running = self.running
        if running:
            request = running[index % len(running)]
            assert request.ticket.slot is not None
            next_up = [r for r in self.waiting if r.ticket.position() == 1]
            request.ticket.slot.release()
            request.ends.append("done")
            granted = self.collect_grants()
            assert granted == next_up  # positions are exact: position 1 is who gets the slot

    def leave(self, index: int) -> None:
        waiting = self.waiting
        if waiting:
            request = waiting[index % len(waiting)]
            request.ticket.leave()
            request.ends.append("left")
            assert self.collect_grants() == []

    def collect_grants(self) -> list[Request]:
        granted = [r for r in self.waiting if r.ticket.slot is not None]
        for request in granted:
            request.ends.append("served")
            self.served.append(request)
        return granted

    def check_figures(self) -> None:
        load = self.admission.load()
        assert load.processing == len(self.running) <= self.slots
        assert load.waiting == len(self.waiting)
        assert sorted(r.ticket.position() for r in self.waiting) == list(range(1, load.waiting + 1))
        if load.waiting:
            assert load.processing == self.slots  # nobody waits while a slot is free

    def drain(self) -> None:
        expected = sorted(self.waiting, key=lambda r: r.ticket.position())
        served_before = len(self.served)
        while self.running:
            self.finish(0)
            self.check_figures()
        assert self.served[served_before:] == expected  # with no more arrivals, in position order


async def _run(slots: int, queue: int, policy: str, events: list[tuple[str, int]]) -> Run:
    run = Run(slots, queue, policy)
    for kind, value in events:
        getattr(run, kind)(value)
        run.check_figures()
    run.drain()
    return run


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 3), queue=st.integers(0, 6), policy=st.sampled_from(["fifo", "fair"]), events=EVENTS)
async def test_every_request_ends_exactly_once_and_slots_are_never_oversold(
    slots: int, queue: int, policy: str, events: list[tuple[str, int]]
) -> None:
    run = await _run(slots, queue, policy, events)
    for request in run.requests:
        assert request.ends in (["served", "done"], ["left"], ["refused"])
    assert len(run.requests) + len(run.refused) == sum(kind == "arrive" for kind, _ in events)


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 3), queue=st.integers(0, 6), policy=st.sampled_from(["fifo", "fair"]), events=EVENTS)
async def test_one_clients_requests_are_served_in_arrival_order(
    slots: int, queue: int, policy: str, events: list[tuple[str, int]]
) -> None:
    run = await _run(slots, queue, policy, events)
    for client in range(4):
        arrivals = [r for r in run.requests if r.client == client and r.ends[0] == "served"]
        assert [r for r in run.served if r.client == client] == arrivals
    if policy == "fifo":
        assert run.served == [r for r in run.requests if r.ends != ["left"]]
        assert run.crowded_out == []


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 3), queue=st.integers(0, 6), events=EVENTS)
async def test_under_fair_admission_a_client_with_one_request_is_never_refused_while_another_holds_more_than_its_share(
    slots: int, queue: int, events: list[tuple[str, int]]
) -> None:
    run = await _run(slots, queue, "fair", events)
    for refusal in run.refused:
        if refusal.held.get(refusal.client, 0) == 0:  # this was its one request
            share = max(1, refusal.max_queue_size // (len(refusal.held) + 1))
            assert all(count <= share for count in refusal.held.values())
    for _, held in run.crowded_out:
        assert held >= 2  # a waiter that gives up its place is never its client's only one


@settings(max_examples=150, deadline=None)
@given(slots=st.integers(1, 3), queue=st.integers(0, 6), events=EVENTS)
async def test_under_fair_admission_no_client_passes_a_waiter_more_often_than_its_own_client_is_served(
    slots: int, queue: int, events: list[tuple[str, int]]
) -> None:
    run = await _run(slots, queue, "fair", events)
    for turn, request in enumerate(run.served):
        while_waiting = run.served[request.grants_before_arrival : turn]
        own = sum(r.client == request.client for r in while_waiting)
        for other in {r.client for r in while_waiting} - {request.client}:
            assert sum(r.client == other for r in while_waiting) <= own + 1
