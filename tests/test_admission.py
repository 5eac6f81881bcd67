"""Admission: a limiter for running generations, a bounded FIFO queue, 429 past it."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from chatstream_asgi.errors import QueueTimeout, TooManyRequests
from chatstream_asgi.runtime.admission import Admission
from chatstream_asgi.runtime.replicas import ReplicaAffinity

pytestmark = pytest.mark.anyio


async def test_free_slot_is_granted_at_once() -> None:
    admission = Admission(2, 0)
    slot = await admission.admit(anyio.Event())
    assert slot is not None
    assert admission.load().processing == 1


async def test_request_past_a_full_queue_is_refused_with_retry_after() -> None:
    admission = Admission(1, 1)
    held = await admission.admit(anyio.Event())
    async with anyio.create_task_group() as tg:
        tg.start_soon(admission.admit, anyio.Event())
        await _until(lambda: admission.load().waiting == 1)
        with pytest.raises(TooManyRequests) as caught:
            await admission.admit(anyio.Event())
        assert caught.value.retry_after >= 1
        assert caught.value.headers()["Retry-After"] == str(caught.value.retry_after)
        assert held is not None
        held.release()
    assert admission.load().processing == 1  # the waiter got the slot (and still holds it)


async def test_zero_queue_size_means_no_waiting() -> None:
    admission = Admission(1, 0)
    await admission.admit(anyio.Event())
    with pytest.raises(TooManyRequests):
        await admission.admit(anyio.Event())


async def test_waiters_are_admitted_in_arrival_order() -> None:
    admission = Admission(1, 5)
    held = await admission.admit(anyio.Event())
    order: list[int] = []

    async def wait(index: int) -> None:
        slot = await admission.admit(anyio.Event())
        order.append(index)
        assert slot is not None
        slot.release()

    async with anyio.create_task_group() as tg:
        for index in range(4):
            tg.start_soon(wait, index)
            await _until(lambda expected=index + 1: admission.load().waiting == expected)
        assert held is not None
        held.release()
    assert order == [0, 1, 2, 3]


async def test_waiter_whose_client_leaves_leaves_the_queue_at_once() -> None:
    admission = Admission(1, 5)
    held = await admission.admit(anyio.Event())
    left = anyio.Event()
    results: list[object] = []

    async def wait() -> None:
        results.append(await admission.admit(left))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await _until(lambda: admission.load().waiting == 1)
        left.set()
    assert results == [None]
    assert admission.load().waiting == 0
    assert held is not None and admission.load().processing == 1


async def test_released_slot_is_free_again_and_release_is_idempotent() -> None:
    admission = Admission(1, 0)
    slot = await admission.admit(anyio.Event())
    assert slot is not None
    slot.release()
    slot.release()
    assert admission.load().processing == 0
    assert await admission.admit(anyio.Event()) is not None


async def test_retry_after_grows_with_the_queue_and_the_time_slots_are_held() -> None:
    admission = Admission(1, 10)
    slot = await admission.admit(anyio.Event())
    assert slot is not None
    slot._acquired_at -= 8.0  # as if the generation had held its slot for 8 s
    slot.release()
    held = await admission.admit(anyio.Event())
    empty_queue_estimate = admission.retry_after()
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(admission.admit, anyio.Event())
        await _until(lambda: admission.load().waiting == 3)
        assert admission.retry_after() > empty_queue_estimate >= 8.0
        tg.cancel_scope.cancel()
    assert held is not None


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="num_of_concurrent_executions"):
        Admission(0, 1)
    with pytest.raises(ValueError, match="max_queue_size"):
        Admission(1, -1)


async def _until(condition: object) -> None:
    with anyio.fail_after(5):
        while not condition():  # type: ignore[operator]
            await anyio.lowlevel.checkpoint()


async def test_waiter_past_its_deadline_leaves_the_queue_with_queue_timeout() -> None:
    admission = Admission(1, 5)
    held = await admission.admit(anyio.Event())
    with pytest.raises(QueueTimeout) as caught:
        await admission.admit(anyio.Event(), max_wait=0)
    assert caught.value.retry_after >= 1
    assert admission.load().waiting == 0
    assert held is not None and admission.load().processing == 1


async def test_free_slot_is_granted_whatever_the_deadline() -> None:
    admission = Admission(1, 5)
    assert await admission.admit(anyio.Event(), max_wait=0) is not None


async def test_eta_and_retry_after_use_the_same_measured_hold_time() -> None:
    admission = Admission(1, 10)
    slot = await admission.admit(anyio.Event())
    assert slot is not None
    slot._acquired_at -= 8.0  # as if the generation had held its slot for 8 s
    slot.release()
    await admission.admit(anyio.Event())
    first, second = admission.enter(), admission.enter()
    assert (first.position(), second.position()) == (1, 2)
    assert (first.eta_s(), second.eta_s()) == (round(admission.estimate(1), 1), round(admission.estimate(2), 1))
    assert admission.estimate(2) == 2 * admission.estimate(1) >= 16.0
    assert admission.retry_after() == admission.estimate(3)  # the next one would be third
    first.leave()
    assert second.position() == 1
    second.leave()
    assert admission.load().waiting == 0


async def test_waiter_hears_its_position_whenever_it_changes() -> None:
    admission = Admission(1, 5)
    held = await admission.admit(anyio.Event())
    ahead = admission.enter()
    heard: list[int] = []

    async def report(position: int, eta_s: float | None) -> None:
        heard.append(position)

    async with anyio.create_task_group() as tg:
        tg.start_soon(admission.enter().wait, anyio.Event(), report)
        await _until(lambda: heard == [2])
        ahead.leave()
        await _until(lambda: heard == [2, 1])
        assert held is not None
        held.release()
    assert heard == [2, 1]
    assert admission.load().processing == 1


async def test_a_preferred_replica_with_a_free_slot_is_chosen() -> None:
    admission = Admission(1, 0, replicas=3)
    slot = await admission.admit(anyio.Event())
    assert slot is not None and slot.replica == 0
    preferred = admission.enter(prefer=2).slot
    assert preferred is not None and preferred.replica == 2
    assert admission.replica_load() == [1, 0, 1]


async def test_a_preferred_replica_that_is_full_gives_way_to_the_least_loaded() -> None:
    admission = Admission(1, 0, replicas=2)
    first = admission.enter().slot
    assert first is not None and first.replica == 0
    second = admission.enter(prefer=0).slot
    assert second is not None and second.replica == 1


async def test_a_waiter_gets_its_preferred_replica_when_a_slot_there_frees() -> None:
    admission = Admission(1, 1, replicas=2)
    on_zero, on_one = admission.enter().slot, admission.enter().slot
    assert on_zero is not None and on_one is not None and on_one.replica == 1
    waiting = admission.enter(prefer=1)
    assert waiting.slot is None
    on_zero.release()  # a slot frees on the other replica: the preference cannot be had
    assert waiting.slot is not None and waiting.slot.replica == 0


def test_replica_affinity_remembers_the_latest_turns_within_its_bound() -> None:
    affinity = ReplicaAffinity(2, capacity=2)
    affinity.ran("a", 1)
    affinity.ran("b", 0)
    affinity.ran("c", 1)
    assert affinity.last("a") is None  # least recently run: forgotten
    assert affinity.last("b") == 0 and affinity.last("c") == 1
    assert affinity.last(None) is None


def test_one_replica_needs_no_affinity() -> None:
    affinity = ReplicaAffinity(1)
    affinity.ran("a", 0)
    assert affinity.last("a") is None


async def test_under_fair_admission_a_full_queue_makes_room_for_a_client_holding_two_fewer_places() -> None:
    admission = Admission(1, 3, policy="fair")
    held = admission.enter("a").slot
    burst = [admission.enter("a") for _ in range(2)] + [admission.enter("b")]
    newcomer = admission.enter("c")  # "a" holds two places, "c" none: a's newest gives way
    assert burst[1].refused is not None and burst[1].position() == 0
    assert [t.position() for t in (burst[0], burst[2], newcomer)] == [1, 2, 3]
    with pytest.raises(TooManyRequests):
        admission.enter("a")  # everyone holds one place, "a" too: nobody gives way to it
    with pytest.raises(TooManyRequests):
        await burst[1].wait(anyio.Event())
    assert admission.load().waiting == 3 and held is not None


async def test_under_fifo_admission_a_full_queue_refuses_whoever_arrives() -> None:
    admission = Admission(1, 2)
    admission.enter("a")
    burst = [admission.enter("a") for _ in range(2)]
    with pytest.raises(TooManyRequests):
        admission.enter("b")
    assert all(ticket.refused is None and ticket.position() for ticket in burst)
