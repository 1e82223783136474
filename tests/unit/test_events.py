"""The event bus: every subscriber gets every event; a stalled one is cut off and counted."""

import asyncio

import pytest

from cri_py.errors import ResourceExhausted
from cri_py.events import CREATED, QUEUE_SIZE, STARTED, EventBus
from cri_py.metrics.registry import events_dropped


async def test_two_subscribers_see_the_same_events_in_order():
    bus = EventBus()
    a, b = bus.subscribe(), bus.subscribe()
    bus.publish(CREATED, "c1", 1, None, [])
    bus.publish(STARTED, "c1", 2, None, [])
    for sub in (a, b):
        assert [(await sub.next()).kind for _ in range(2)] == [CREATED, STARTED]


async def test_events_carry_snapshots_not_live_objects():
    bus = EventBus()
    sub = bus.subscribe()
    record = {"state": "CREATED"}
    bus.publish(CREATED, "c1", 1, record, [record])
    record["state"] = "RUNNING"
    event = await sub.next()
    assert event.sandbox == {"state": "CREATED"} and event.containers == [{"state": "CREATED"}]


async def test_a_stalled_subscriber_is_cut_off_and_the_others_go_on():
    bus = EventBus()
    slow, fast = bus.subscribe(), bus.subscribe()
    before = events_dropped._value.get()
    for i in range(QUEUE_SIZE + 5):
        bus.publish(CREATED, f"c{i}", i, None, [])
        await fast.next()
    with pytest.raises(ResourceExhausted):
        await slow.next()
    assert bus.subscribers == 1
    assert events_dropped._value.get() - before >= QUEUE_SIZE
    # memory stays bounded: the cut-off queue holds only its end marker
    assert slow.queue.qsize() == 0


async def test_closed_subscriptions_receive_nothing():
    bus = EventBus()
    sub = bus.subscribe()
    sub.close()
    bus.publish(CREATED, "c1", 1, None, [])
    assert sub.queue.empty() and bus.subscribers == 0
    await asyncio.sleep(0)
